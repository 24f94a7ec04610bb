import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def weed(tmp_path_factory):
    """A throwaway SeaweedFS S3 server for the module's tests (skipped without `weed`)."""
    from servers import NO_WEED, find_weed, weed_s3_server

    if find_weed() is None:
        pytest.skip(NO_WEED)
    with weed_s3_server(tmp_path_factory.mktemp("weed")) as server:
        yield server


def tiny_llama(seed: int = 0, **overrides):
    """A random 4-layer LLaMA built in code (no downloads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    kw.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


@pytest.fixture
def llama():
    return tiny_llama()


def tiny_tokenizer(corpus=None, vocab_size=300):
    """A small BPE tokenizer trained in-process (no downloads), with <s>, </s>, <pad>; on
    `corpus` (texts) when given, else on a few prompt-like lines."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = (
        corpus
        or [
            "Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.",
            "### Instruction:\nContext: N/A\nQuestion: Which is a mammal?\nOptions: (A) cat (B) fish",
            "### Response:\nAnswer: The answer is A.",
        ]
        * 20
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def search_model(dtype=torch.float32, **config):
    """A tiny LLaMA in search mode (3 experts of rank 2, top-1, no dropout) and its adapter,
    the LoRA weights moved off their zero start so GSV gradients are not zero."""
    from guilomo.moe.search import inject_search, weight_parameters

    # eager attention: the exact HVP of test_bilevel needs double backward, which SDPA lacks
    model = tiny_llama(num_hidden_layers=2, attn_implementation="eager").to(dtype)
    adapter = inject_search(
        model,
        base_model="tiny",
        max_experts=3,
        max_rank=2,
        top_k=1,
        lora_dropout=0.0,
        seed=1,
        **config,
    )
    with torch.no_grad():  # B = 0 at init would zero the GSV gradients; move off it
        for p in weight_parameters(adapter).values():
            p.add_(0.1 * torch.randn_like(p))
    return model, adapter
