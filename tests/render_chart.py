"""Render charts/guilomo with helm-python-sdk (Helm's Go SDK, no helm binary): one file per
template under OUT. Runs in the lint environment (.venv-lint), not the project's:

    .venv-lint/bin/python tests/render_chart.py CHART OUT [-f VALUES.yaml ...] [--set-json JSON]

Values files merge left to right, then --set-json. The merged values are checked against
values.schema.json first. Exit 0: rendered; 3: refused by the schema; 4: a template failed
(validateValues' `fail` messages land here); the message is on stderr.
"""

import argparse
import json
import sys
from pathlib import Path

import helm_python as helm


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("chart", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("-f", "--values", action="append", default=[], type=Path)
    ap.add_argument("--set-json", default="{}", help="a JSON object merged last")
    ap.add_argument("--name", default="guilomo")
    ap.add_argument("--namespace", default="ml-team")
    args = ap.parse_args()

    values: dict = {}
    for path in args.values:
        values = _merge(values, helm.values_from_yaml(path.read_text()) or {})
    values = _merge(values, json.loads(args.set_json))
    chart = helm.Chart.load(args.chart)
    try:
        chart.validate_schema(chart.merge_values(values))
    except helm.HelmError as exc:
        print(f"values refused by values.schema.json: {exc}", file=sys.stderr)
        return 3
    try:
        manifests = chart.render(values, name=args.name, namespace=args.namespace, is_install=True)
    except helm.HelmError as exc:
        print(f"render failed: {exc}", file=sys.stderr)
        return 4
    args.out.mkdir(parents=True, exist_ok=True)
    for template, text in sorted(manifests.items()):
        if not template.endswith((".yaml", ".yml", ".txt")) or not text.strip():
            continue
        name = template.replace("/", "__")
        (args.out / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
