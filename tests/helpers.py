"""Test helpers: tiny model specs and exact statistics (no scipy needed)."""

from __future__ import annotations

import json

import torch

from dspark.data.corpus import Document
from dspark.models import random_hf_model

FAMILIES = ("llama", "qwen2", "qwen3")

# GQA everywhere; qwen2 ties its embeddings, llama and qwen3 do not
TINY = {
    "llama": dict(model_type="llama", vocab_size=101, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  tie_word_embeddings=False, eos_token_id=100, bos_token_id=1, pad_token_id=0),
    "qwen2": dict(model_type="qwen2", vocab_size=101, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                  tie_word_embeddings=True, eos_token_id=100, bos_token_id=1, pad_token_id=0),
    "qwen3": dict(model_type="qwen3", vocab_size=101, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                  tie_word_embeddings=False, eos_token_id=100, bos_token_id=1, pad_token_id=0),
}


def tiny_hf_model(family: str, seed: int = 0, scale: float = 1.0, **overrides):
    """A tiny random ``transformers`` model; ``scale`` multiplies every weight (sharper distributions)."""
    model = random_hf_model({**TINY[family], **overrides}, seed=seed)
    if scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.mul_(scale)
    return model


def ragged_prompts(vocab: int, lengths=(5, 1, 9, 3), seed: int = 0) -> list[list[int]]:
    """Prompts of different lengths with ids in ``[2, vocab-2]`` (no EOS / pad)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab - 2, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generation of one prompt, EOS not stopping it."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def chi_square_p_value(observed: torch.Tensor, expected_probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit; cells with expected count < ``min_expected`` are pooled.

    Returns the p-value, from the regularised upper incomplete gamma function.
    """
    observed = observed.double().flatten()
    expected = expected_probs.double().flatten() * observed.sum()
    small = expected < min_expected
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum().view(1)])
        expected = torch.cat([expected[~small], expected[small].sum().view(1)])
        if expected[-1] < min_expected:  # pooled remainder still tiny: fold it into the largest cell
            top = expected[:-1].argmax()
            observed[top] += observed[-1]
            expected[top] += expected[-1]
            observed, expected = observed[:-1], expected[:-1]
    stat = ((observed - expected) ** 2 / expected).sum()
    dof = observed.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def fake_clock_scheduler(drafted_cost: float, base=None):
    """A ``dspark`` (or ``base``) scheduler class whose measured fallback sees a fixed cost per kind of round
    (a drafted round costs ``drafted_cost`` plain ones) instead of the wall clock: it switches
    between drafted and plain rounds like the real one, deterministically. Register it to use it."""
    from dspark.scheduling import DSparkScheduler

    class FakeClockScheduler(base or DSparkScheduler):
        def timed(self, batch_size, drafted, seconds, tokens_per_request):
            super().timed(batch_size, drafted, drafted_cost if drafted else 1.0, tokens_per_request)

    return FakeClockScheduler


# a tiny two-domain corpus (code and prose, 6 train documents each, one validation and one test)
CODE = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
PROSE = "The function adds two numbers and returns their sum to the caller. "


def corpus() -> list[Document]:
    """The tiny corpus's documents."""
    splits = ["train"] * 6 + ["validation", "test"]
    return [Document(f"m{i}.py", "code", s, CODE * 20) for i, s in enumerate(splits)] + \
           [Document(f"d{i}", "prose", s, PROSE * 20) for i, s in enumerate(splits)]


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation written out (references of formats defined elsewhere)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half rotary embedding of ``x`` ``[T, heads, D]`` at ``positions`` ``[T]``, the angles
    in float32 as ``transformers`` and vLLM compute them."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = positions.float()[:, None] * inv_freq  # [T, D/2]
    cos, sin = (torch.cat([f(angles)] * 2, -1)[:, None].double() for f in (torch.cos, torch.sin))
    return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin


def first_proposal(pipe, prompt: list[int], seed: int = 3):
    """Sample two tokens of ``prompt`` at temperature 1: the drafter's first proposal (drafted
    after the prefill) and the anchor it drafted from."""
    seen = []
    original = pipe.drafter.propose
    pipe.drafter.propose = lambda state, u: seen.append(original(state, u)) or seen[-1]
    result = pipe.generate([prompt], max_new_tokens=2, temperature=1.0, seed=seed, ignore_eos=True)
    pipe.drafter.propose = original
    return seen[0], result.token_ids[0][0]


def assert_drafted_greedy_equals_transformers(pipe, model, prompt: list[int], max_new_tokens: int) -> None:
    """Greedy speculative decoding of ``prompt`` equals ``transformers``' own greedy output, and
    the drafter drafted (so that the check is not plain decoding's)."""
    out = pipe.generate([prompt], max_new_tokens=max_new_tokens, ignore_eos=True)
    assert out.token_ids[0] == hf_greedy(model, prompt, max_new_tokens)
    assert out.stats.drafted_tokens > 0


def assert_graphs_change_nothing(eager, graphed, target_model, max_new_tokens: int = 24) -> None:
    """On CUDA: ``graphed`` (``engine.cuda_graphs``) gives ``eager``'s tokens greedy and sampled (same
    seeds), and greedy decoding with the drafter is plain decoding's (of ``target_model``)."""
    import dspark

    plain = dspark.build_pipeline({"target": {"device": "cuda", "dtype": "float32"}, "drafter": {"name": "none"}},
                                  target_model=target_model)
    prompts = [[3, 14, 15, 92, 65, 35], [5, 17, 33, 2]]
    for temperature in (0.0, 1.0):
        runs = [p.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=4, ignore_eos=True)
                for p in (eager, graphed)]
        assert runs[0].token_ids == runs[1].token_ids
    greedy = plain.generate(prompts, max_new_tokens=max_new_tokens, ignore_eos=True)
    assert eager.generate(prompts, max_new_tokens=max_new_tokens, ignore_eos=True).token_ids == greedy.token_ids


def sentencepiece_style_tokenizer():
    """A word-level tokenizer that splits and decodes as Llama 2's and Mistral's SentencePiece ones
    do: a word carries its space as a leading ``▁``, which the decoder drops at the start of a
    decoding (``▁Paris`` alone reads ``Paris``). Ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, then words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "The capital of France is Paris . a river flows , and".split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"▁{w}": 3 + i for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def byte_fallback_tokenizer():
    """A BPE tokenizer with byte fallback, split and decoded as Llama 2's, Mistral's and Gemma's
    SentencePiece ones are: a character missing from its vocabulary (here: anything not Latin) is
    a run of ``<0xNN>`` byte tokens, which the decoder turns back into text a run at a time — a
    run that is not valid UTF-8 as a whole decodes to U+FFFD throughout. Trained here on a few
    English lines (deterministic); ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = ["Hello world, the capital of France is Paris.", "Once upon a time there was a little girl.",
             "The quick brown fox jumps over the lazy dog.", "import numpy as np\nprint(np.zeros(3))"] * 10
    core = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    core.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    spec = json.loads(core.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):  # the byte pieces it falls back to
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def needs_custom_code(model_dir=None, tokenizer_dir=None) -> None:
    """Make a saved checkpoint's model (a Qwen3) and/or tokenizer load only through classes it ships
    as code (``custom_model.py``, ``custom_tokenizer.py``): what ``trust_remote_code`` guards."""
    from pathlib import Path

    if model_dir is not None:
        path = Path(model_dir) / "config.json"
        spec = json.loads(path.read_text())
        spec.update(model_type="custom_lm", architectures=["CustomForCausalLM"],
                    auto_map={"AutoConfig": "custom_model.CustomConfig",
                              "AutoModelForCausalLM": "custom_model.CustomForCausalLM"})
        path.write_text(json.dumps(spec))
        (Path(model_dir) / "custom_model.py").write_text(
            "from transformers import Qwen3Config, Qwen3ForCausalLM\n\n\n"
            "class CustomConfig(Qwen3Config):\n    model_type = 'custom_lm'\n\n\n"
            "class CustomForCausalLM(Qwen3ForCausalLM):\n    config_class = CustomConfig\n")
    if tokenizer_dir is not None:
        path = Path(tokenizer_dir) / "tokenizer_config.json"
        settings = json.loads(path.read_text())
        settings.pop("tokenizer_class", None)
        settings["auto_map"] = {"AutoTokenizer": [None, "custom_tokenizer.CustomTokenizer"]}
        path.write_text(json.dumps(settings))
        (Path(tokenizer_dir) / "custom_tokenizer.py").write_text(
            "from transformers import PreTrainedTokenizerFast\n\n\n"
            "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n")
