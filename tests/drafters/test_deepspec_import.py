"""DSpark / DFlash drafters released with DeepSpec (``Qwen3DSparkModel``): the imported drafter
drafts what DeepSpec's definition computes, written out here independently of dspark's layers from
the released tensor names; decoding with it stays lossless; what dspark cannot run is refused."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import dspark
from dspark.drafters.dspark import load_block_drafter
from dspark.models import load_model
from dspark.models.loading import CheckpointError

from helpers import (assert_drafted_greedy_equals_transformers, assert_graphs_change_nothing, first_proposal, rms,
                     rotate, tiny_hf_model)

BLOCK, MASK, RANK, INTER = 4, 99, 16, 96
VARIANTS = {  # markov_rank, markov_head_type, enable_confidence_head, confidence_head_with_markov
    "dspark": (RANK, "vanilla", True, True),
    "rnn": (RANK, "rnn", True, True),
    "confidence_reads_hidden": (RANK, "vanilla", True, False),
    "dflash": (0, None, False, False),
    "zlab_dflash": (0, None, False, False),  # z-lab's own DFlash format: mask positions draft themselves
}


def target_model():
    return tiny_hf_model("qwen3", scale=2.0)  # 3 layers, hidden 64, 4 heads (2 KV) of 32


def released_drafter(target_hf, variant="dspark", seed=1, copies_dtype=torch.float32, **config_overrides):
    """A random drafter in DeepSpec's format: ``(config, tensors)``, named as released."""
    rank, head_type, confidence, with_markov = VARIANTS[variant]
    c = target_hf.config
    hidden, heads, kv_heads, head_dim, vocab = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size
    config = {**c.to_dict(), "architectures": ["Qwen3DSparkModel"], "num_hidden_layers": 2, "intermediate_size": INTER,
              "num_target_layers": c.num_hidden_layers, "block_size": BLOCK, "target_layer_ids": [0, 1],
              "mask_token_id": MASK, "num_anchors": 8, "markov_rank": rank, "enable_confidence_head": confidence,
              "tie_word_embeddings": False}
    if variant == "zlab_dflash":  # its fields under dflash_config, B = γ + 1 (the anchor drafts nothing)
        for key in ("target_layer_ids", "mask_token_id", "num_anchors", "markov_rank", "enable_confidence_head"):
            config.pop(key)
        config.update(architectures=["DFlashDraftModel"], block_size=BLOCK + 1,
                      dflash_config={"target_layer_ids": [0, 1], "mask_token_id": MASK})
    if head_type:
        config["markov_head_type"] = head_type
    if confidence:
        config["confidence_head_with_markov"] = with_markov
    config.update(config_overrides)
    g = torch.Generator().manual_seed(seed)
    w = lambda *shape, scale=0.3: torch.randn(*shape, generator=g) * scale  # noqa: E731
    norm = lambda n=hidden: 1 + 0.2 * torch.randn(n, generator=g)  # noqa: E731
    tensors = {"fc.weight": w(hidden, 2 * hidden, scale=0.2), "hidden_norm.weight": norm(), "norm.weight": norm(),
               "embed_tokens.weight": target_hf.get_input_embeddings().weight.detach().to(copies_dtype),
               "lm_head.weight": target_hf.get_output_embeddings().weight.detach().to(copies_dtype)}
    for i in range(2):
        p = f"layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": w(heads * head_dim, hidden), p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden), p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
            p + "self_attn.q_norm.weight": norm(head_dim), p + "self_attn.k_norm.weight": norm(head_dim),
            p + "mlp.gate_proj.weight": w(INTER, hidden), p + "mlp.up_proj.weight": w(INTER, hidden),
            p + "mlp.down_proj.weight": w(hidden, INTER),
            p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
        })
    if rank:
        tensors.update({"markov_head.markov_w1.weight": w(vocab, rank, scale=1.0),
                        "markov_head.markov_w2.weight": w(vocab, rank, scale=0.5)})
    if head_type == "rnn":
        tensors.update({"markov_head.joint_proj.weight": w(3 * rank, 2 * rank + hidden),
                        "markov_head.joint_proj.bias": w(3 * rank)})
    if confidence:
        tensors.update({"confidence_head.proj.weight": w(1, hidden + (rank if with_markov else 0)),
                        "confidence_head.proj.bias": w(1)})
    if variant == "zlab_dflash":  # z-lab's files hold no embedding or LM head
        del tensors["embed_tokens.weight"], tensors["lm_head.weight"]
    return config, tensors


def save_released(directory, config, tensors):
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors")
    return directory


def reference_block(config, tensors, target_hf, prompt, anchor, drafts):
    """DeepSpec's definition in float64 for one request: the block's draft distributions (teacher-
    forced on ``drafts``) ``[γ, V]`` and confidences ``[γ]`` (``None`` without the head)."""
    t = {k: v.double() for k, v in tensors.items()}
    eps, theta = config["rms_norm_eps"], config["rope_parameters"]["rope_theta"]
    heads, kv_heads, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    model = copy.deepcopy(target_hf).double()
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([prompt]), output_hidden_states=True).hidden_states
    n = len(prompt)
    zlab = config["architectures"] == ["DFlashDraftModel"]  # B = γ + 1 positions, drafts from positions 1..γ
    fields = config["dflash_config"] if zlab else config
    width = BLOCK + 1 if zlab else BLOCK
    context = torch.cat([hidden[i + 1][0] for i in fields["target_layer_ids"]], -1) @ t["fc.weight"].T
    context = rms(context, t["hidden_norm.weight"], eps)  # [n, H], into k/v as it is
    embedding = model.get_input_embeddings().weight.detach()  # the target's (a copy in DeepSpec's files)
    x = embedding[[anchor] + [fields["mask_token_id"]] * (width - 1)]
    ctx_pos, block_pos = torch.arange(n), torch.arange(n, n + width)
    for i in range(config["num_hidden_layers"]):
        p = f"layers.{i}."
        proj = lambda h, name, nh: (h @ t[p + f"self_attn.{name}_proj.weight"].T).view(len(h), nh, d)  # noqa: E731
        k_norm, q_norm = t[p + "self_attn.k_norm.weight"], t[p + "self_attn.q_norm.weight"]
        h = rms(x, t[p + "input_layernorm.weight"], eps)
        q = rotate(rms(proj(h, "q", heads), q_norm, eps), block_pos, theta)
        k = torch.cat([rotate(rms(proj(context, "k", kv_heads), k_norm, eps), ctx_pos, theta),
                       rotate(rms(proj(h, "k", kv_heads), k_norm, eps), block_pos, theta)])
        v = torch.cat([proj(context, "v", kv_heads), proj(h, "v", kv_heads)])
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)  # the block sees all context and itself
        x = x + torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(width, -1) @ t[p + "self_attn.o_proj.weight"].T
        y = rms(x, t[p + "post_attention_layernorm.weight"], eps)
        x = x + (F.silu(y @ t[p + "mlp.gate_proj.weight"].T) * (y @ t[p + "mlp.up_proj.weight"].T)) @ t[p + "mlp.down_proj.weight"].T
    h = rms(x, t["norm.weight"], eps)[width - BLOCK:]  # [γ, H]
    logits = h @ model.get_output_embeddings().weight.detach().T  # [γ, V]: the target's LM head
    previous = torch.tensor([anchor] + drafts[:-1])
    rank, head_type = config.get("markov_rank", 0), config.get("markov_head_type")
    if rank:
        w1 = t["markov_head.markov_w1.weight"][previous]  # [γ, r]
        if head_type == "vanilla":
            logits = logits + w1 @ t["markov_head.markov_w2.weight"].T
        else:  # rnn: state over [s_{k-1}; W1[x_{k-1}]; h_k]
            state, biases = torch.zeros(rank, dtype=torch.float64), []
            for k in range(BLOCK):
                z = torch.cat([state, w1[k], h[k]]) @ t["markov_head.joint_proj.weight"].T + t["markov_head.joint_proj.bias"]
                gate, candidate, out = z.chunk(3)
                state = torch.sigmoid(gate) * state + (1 - torch.sigmoid(gate)) * torch.tanh(candidate)
                biases.append(torch.tanh(out) @ t["markov_head.markov_w2.weight"].T)
            logits = logits + torch.stack(biases)
    confidence = None
    if config.get("enable_confidence_head"):
        features = torch.cat([h, w1], -1) if config["confidence_head_with_markov"] else h
        confidence = torch.sigmoid(features @ t["confidence_head.proj.weight"].T + t["confidence_head.proj.bias"])[:, 0]
    return logits.softmax(-1), confidence


def block_pipeline(target_hf, path, *overrides):
    return dspark.build_pipeline({"target": {"device": "cpu", "dtype": "float64"},
                                  "drafter": {"name": "dspark", "num_speculative_tokens": BLOCK, "path": str(path)}},
                                 target_model=target_hf, overrides=list(overrides))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_imported_drafter_drafts_what_deepspec_defines(tmp_path, variant):
    """q and c of every draft position equal DeepSpec's definition (teacher-forced on the drafts;
    1e-5: transformers normalises in float32 even in float64, a wrong mapping is off by ~0.1)."""
    target_hf = target_model()
    config, tensors = released_drafter(target_hf, variant)
    pipe = block_pipeline(target_hf, save_released(tmp_path / "drafter", config, tensors))
    prompt = [5, 17, 33, 2, 90, 41, 7]
    proposal, anchor = first_proposal(pipe, prompt)
    probs, confidence = reference_block(config, tensors, target_hf, prompt, anchor, proposal.tokens[0].tolist())
    assert torch.allclose(proposal.probs[0], probs, atol=1e-5), (proposal.probs[0] - probs).abs().max()
    if confidence is None:
        assert proposal.confidence is None and not pipe.drafter.provides_confidence
    else:
        assert torch.allclose(proposal.confidence[0], confidence, atol=1e-5)


def test_imported_drafter_keeps_greedy_decoding_exact(tmp_path):
    target_hf = target_model()
    path = save_released(tmp_path / "drafter", *released_drafter(target_hf, "dspark", copies_dtype=torch.bfloat16))
    pipe = block_pipeline(target_hf, path)
    assert_drafted_greedy_equals_transformers(pipe, target_hf, [3, 14, 15, 92, 65, 35], 24)


def test_dflash_without_a_confidence_head_is_refused_by_a_scheduler_that_reads_confidences(tmp_path):
    target_hf = target_model()
    path = save_released(tmp_path / "dflash", *released_drafter(target_hf, "dflash"))
    with pytest.raises(ValueError, match=r"scheduler 'threshold' reads draft confidences, which this 'dspark' "
                                         r"drafter does not produce \(its checkpoint has no confidence head\)"):
        block_pipeline(target_hf, path, "scheduler.name=threshold")
    from dspark.scheduling.recipes import calibrate

    target_hf.save_pretrained(tmp_path / "target")
    config = {"target": {"path": str(tmp_path / "target"), "device": "cpu"},
              "drafter": {"name": "dspark", "path": str(path), "num_speculative_tokens": BLOCK}}
    with pytest.raises(ValueError, match="dspark calibrate needs confidences, and this 'dspark' drafter's checkpoint "
                                         "has no confidence head"):
        calibrate(config, [], output=str(tmp_path / "calibration.json"))


def test_what_dspark_cannot_run_is_refused_naming_it(tmp_path):
    target_hf = target_model()
    target = load_model(target_hf)
    config, tensors = released_drafter(target_hf)
    # first what it can: the mask input is the target's embedding of mask_token_id, a copy
    net = load_block_drafter(save_released(tmp_path / "fine", config, tensors), target)
    mask_row = target.embed_tokens.weight[MASK]
    assert torch.equal(net.mask_embedding, mask_row) and net.mask_embedding.data_ptr() != mask_row.data_ptr()
    cases = {
        "gated": ({"markov_head_type": "gated"}, r"markov_head_type 'gated' \(dspark runs vanilla, rnn"),
        "embedding_layer": ({"target_layer_ids": [-1, 1]}, r"target_layer_ids \[-1, 1\] \(ids of target layers 0..1"),
        "last_layer": ({"target_layer_ids": [0, 2]}, r"target_layer_ids \[0, 2\] .*never reads the last layer"),
        "depth": ({"num_target_layers": 36}, r"num_target_layers 36 \(target: 3\)"),
        "width": ({"hidden_size": 32}, r"hidden_size 32 \(target: 64\)"),
        "mask": ({"mask_token_id": 101}, r"mask_token_id 101 \(a token id in \[0, 101\)\)"),
        "rope": ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}, r"rope .* \(not the target's rotary"),
    }
    for name, (change, message) in cases.items():
        path = save_released(tmp_path / name, {**config, **change}, tensors)
        with pytest.raises(ValueError, match="is a DeepSpec drafter dspark cannot run on this target: " + message):
            load_block_drafter(path, target)
    other_head = {**tensors, "lm_head.weight": tensors["lm_head.weight"] + 1}
    with pytest.raises(ValueError, match="carries a lm_head that is not the target's"):
        load_block_drafter(save_released(tmp_path / "head", config, other_head), target)
    missing = {k: v for k, v in tensors.items() if k != "layers.1.self_attn.k_norm.weight"}
    with pytest.raises(CheckpointError, match=r"missing \['layers.1.self_attn.k_norm.weight'\], unexpected \[\]"):
        load_block_drafter(save_released(tmp_path / "missing", config, missing), target)
    norm = {**tensors, "layers.0.self_attn.q_norm.weight": torch.ones(4, 32)}
    with pytest.raises(CheckpointError, match=r"layers.0.self_attn.q_norm.weight has shape \(4, 32\), expected one "
                                              r"weight per head dimension"):
        load_block_drafter(save_released(tmp_path / "norm", config, norm), target)
    extra = {**tensors, "layers.2.mlp.up_proj.weight": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"unexpected \['layers.2.mlp.up_proj.weight'\]"):
        load_block_drafter(save_released(tmp_path / "extra", config, extra), target)
    gemma = save_released(tmp_path / "gemma", {**config, "architectures": ["Gemma4DSparkModel"]}, tensors)
    with pytest.raises(ValueError, match="for a Gemma 4 target, which dspark does not run natively"):
        load_block_drafter(gemma, target)


def test_compiled_rounds_with_a_drafter_without_confidences_keep_greedy_decoding_exact(tmp_path):
    """engine.compile: the compiled block forward returns no confidences (DFlash) and the context
    enters without the input norm; the tokens stay the target's greedy ones."""
    target_hf = target_model()
    path = save_released(tmp_path / "dflash", *released_drafter(target_hf, "dflash"))
    pipe = block_pipeline(target_hf, path, "engine.compile=true")
    assert_drafted_greedy_equals_transformers(pipe, target_hf, [3, 14, 15, 92, 65, 35], 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", ["dspark", "rnn", "dflash"])
def test_imported_drafter_on_cuda_with_graphs(tmp_path, variant):
    """On CUDA, graphed rounds give the eager rounds' tokens (greedy and seeded sampling), and greedy
    decoding with the drafter is plain decoding's."""
    target_hf = target_model()
    path = save_released(tmp_path / "drafter", *released_drafter(target_hf, variant))
    on_cuda = ["target.device=cuda", "target.dtype=float32"]
    eager = block_pipeline(target_hf, path, *on_cuda, "engine.trim_idle_slots=false")  # (as graphed rounds)
    graphed = block_pipeline(target_hf, path, *on_cuda, "engine.cuda_graphs=true")
    assert_graphs_change_nothing(eager, graphed, target_hf)


def test_a_drafter_that_cannot_run_is_refused_before_the_target_is_loaded(tmp_path, monkeypatch):
    """build_pipeline checks the drafter's files against the target's config first (a skeleton on
    the meta device): a mismatch costs no load of the target's weights."""
    import dspark.pipeline

    target_hf = target_model()
    target_hf.save_pretrained(tmp_path / "target")
    config, tensors = released_drafter(target_hf)
    wrong = save_released(tmp_path / "wrong", {**config, "num_target_layers": 36}, tensors)
    right = save_released(tmp_path / "right", config, tensors)
    monkeypatch.setattr(dspark.pipeline, "load_model", lambda *a, **k: pytest.fail("the target's weights were read"))
    build = lambda path, gamma: dspark.build_pipeline({  # noqa: E731
        "target": {"path": str(tmp_path / "target"), "device": "cpu"},
        "drafter": {"name": "dspark", "path": str(path), "num_speculative_tokens": gamma}})
    with pytest.raises(ValueError, match=r"num_target_layers 36 \(target: 3\)"):
        build(wrong, BLOCK)
    with pytest.raises(ValueError, match=rf"num_speculative_tokens={BLOCK + 1} exceeds the block size .* \({BLOCK}\)"):
        build(right, BLOCK + 1)


def test_zlab_layout_is_read_not_trained(tmp_path):
    """The block drafter recipe trains the anchor-drafts-x_1 layout only; z-lab's is refused there."""
    from dspark.training.block_drafter import BlockDrafterModule
    from dspark.training.modules import OptimConfig

    target_hf = target_model()
    net = load_block_drafter(save_released(tmp_path / "zlab", *released_drafter(target_hf, "zlab_dflash")),
                             load_model(target_hf))
    assert (net.args.anchor_predicts, net.args.gamma, net.args.block_width) == (False, BLOCK, BLOCK + 1)
    with pytest.raises(ValueError, match="z-lab's DFlash layout is read, not trained"):
        BlockDrafterModule(net, load_model(target_hf), OptimConfig(), 1)

