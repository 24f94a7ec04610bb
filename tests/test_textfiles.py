"""User-supplied text files that are not UTF-8: one error that names the file and the fix."""

import codecs
import json

import pytest

from guilomo.cluster import load_gpu_pool
from guilomo.data.prompts import load_template
from guilomo.runs import read_yaml
from guilomo.stages.allocate import AllocationInputError, import_reference_json
from guilomo.textfiles import decode_utf8, read_text


@pytest.mark.parametrize(
    "encoding,looks",
    [
        ("utf-16", "looks like UTF-16"),  # Python writes the byte-order mark of its byte order
        ("utf-16-be", None),  # no mark: only the failing byte can be told
        ("utf-32", "looks like UTF-32"),  # its LE mark starts with UTF-16 LE's: told apart
    ],
)
def test_decode_names_the_byte_and_recognises_a_byte_order_mark(encoding, looks):
    data = "é: 1\n".encode(encoding)
    if encoding == "utf-16-be":
        data = "é".encode("latin-1") + data  # 0xe9 then 0x00: not UTF-8
    with pytest.raises(ValueError) as err:
        decode_utf8(data, "f.yaml")
    message = str(err.value)
    assert message.startswith(f"f.yaml: not UTF-8 text (byte 0x{data[0]:02x} at position 0")
    assert message.endswith("; save it as UTF-8")
    assert (looks in message) if looks else "looks like" not in message


def test_utf8_with_or_without_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(codecs.BOM_UTF8 + "café".encode())
    assert read_text(path) == "café"
    path.write_text("café", encoding="utf-8")
    assert read_text(path) == "café"


def test_every_reader_of_user_files_names_the_file(tmp_path):
    utf16 = tmp_path / "c.yaml"
    utf16.write_bytes("seed: 1\n".encode("utf-16"))
    with pytest.raises(ValueError, match=r"c.yaml: not UTF-8 text .*looks like UTF-16"):
        read_yaml(utf16)
    with pytest.raises(ValueError, match=r"c.yaml: not UTF-8 text .*looks like UTF-16"):
        load_gpu_pool(utf16, "a100")

    template = tmp_path / "t.json"
    text = json.dumps({"prompt_input": "é"}, ensure_ascii=False)
    template.write_bytes(text.encode("latin-1"))
    at = text.index("é")
    with pytest.raises(ValueError, match=rf"t.json: not UTF-8 text \(byte 0xe9 at position {at}\)"):
        load_template(str(template))

    expert, rank = tmp_path / "expert.json", tmp_path / "rank.json"
    expert.write_bytes(json.dumps({"a.q_proj": 2}).encode("utf-16"))
    rank.write_text("{}")
    with pytest.raises(AllocationInputError, match=r"expert.json: not UTF-8 .*UTF-16"):
        import_reference_json(expert, rank, base_model="m", module_names=["a.q_proj"], top_k=1)
