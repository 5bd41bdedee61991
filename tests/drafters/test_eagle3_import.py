"""Published EAGLE-3 heads (EAGLE / SpecForge format, as vLLM and SGLang serve them): the imported
head drafts what the format's own definition computes, written out here independently of dspark's
layers from the published tensor names; decoding with it stays lossless; what dspark cannot run
is refused, naming it."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import dspark
from dspark.drafters.eagle3 import load_eagle3
from dspark.models import load_model
from dspark.models.loading import CheckpointError

from helpers import (assert_drafted_greedy_equals_transformers, assert_graphs_change_nothing, first_proposal, rms,
                     rotate, tiny_hf_model)

LAYERS = 6  # the target's depth: default aux ids (2, 3, 3)


def target_model(**overrides):
    return tiny_hf_model("llama", scale=2.0, num_hidden_layers=LAYERS, **overrides)


def published_head(target_hf, *, draft_vocab=None, aux=None, aux_in_eagle_config=False,
                   norm_before_residual=False, seed=1, **config_overrides):
    """A random head in the published format: ``(config, tensors)`` (tensors named as published)."""
    c = target_hf.config
    hidden, heads, kv_heads, head_dim, inter = c.hidden_size, 4, 2, c.head_dim, 96
    vocab = c.vocab_size
    config = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "head_dim": head_dim, "num_hidden_layers": 1, "rms_norm_eps": 1e-5, "vocab_size": vocab,
              "draft_vocab_size": draft_vocab or vocab, "rope_theta": c.rope_parameters["rope_theta"],
              "max_position_embeddings": 256, "hidden_act": "silu", "tie_word_embeddings": False}
    if norm_before_residual:
        config["norm_before_residual"] = True
    if aux is not None:
        if aux_in_eagle_config:
            config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": aux, "use_aux_hidden_state": True}
        else:
            config["eagle_aux_hidden_state_layer_ids"] = aux
    config.update(config_overrides)
    g = torch.Generator().manual_seed(seed)
    w = lambda *shape, scale=0.3: torch.randn(*shape, generator=g) * scale  # noqa: E731
    norm = lambda: 1 + 0.2 * torch.randn(hidden, generator=g)  # noqa: E731
    tensors = {
        "fc.weight": w(hidden, 3 * hidden, scale=0.15),
        "midlayer.self_attn.q_proj.weight": w(heads * head_dim, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": w(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": w(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": w(hidden, heads * head_dim),
        "midlayer.mlp.gate_proj.weight": w(inter, hidden),
        "midlayer.mlp.up_proj.weight": w(inter, hidden),
        "midlayer.mlp.down_proj.weight": w(hidden, inter),
        "midlayer.input_layernorm.weight": norm(),
        "midlayer.hidden_norm.weight": norm(),
        "midlayer.post_attention_layernorm.weight": norm(),
        "norm.weight": norm(),
        "lm_head.weight": w(draft_vocab or vocab, hidden, scale=1.0),
    }
    if draft_vocab:  # a sorted subset of the target's ids, stored as offsets (target = draft + d2t[draft])
        ids = torch.randperm(vocab, generator=g)[:draft_vocab].sort().values
        tensors["d2t"] = ids - torch.arange(draft_vocab)
        tensors["t2d"] = torch.zeros(vocab, dtype=torch.bool).index_fill(0, ids, True)
    return config, tensors


def deepspec_head(target_hf, *, own_lm_head=False, seed=2):
    """A random head in DeepSpec's format (``Qwen3Eagle3Model``): ``(config, tensors)``; five fused
    layer outputs, Qwen3 q/k norms, copies of the target's embedding and (unless ``own_lm_head``) LM head."""
    c = target_hf.config
    config, tensors = published_head(target_hf, seed=seed)
    config = {**c.to_dict(), "architectures": ["Qwen3Eagle3Model"], "num_hidden_layers": 1, "layer_types": ["full_attention"],
              "num_target_layers": LAYERS, "target_layer_ids": [0, 1, 2, 3, 4], "ttt_length": 5, "step_loss_decay": 0.8,
              "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}
    g = torch.Generator().manual_seed(seed + 1)
    tensors = {k.replace("midlayer.", "layers.0."): v for k, v in tensors.items()}
    tensors["fc.weight"] = torch.randn(c.hidden_size, 5 * c.hidden_size, generator=g) * 0.1
    for name in ("q_norm", "k_norm"):
        tensors[f"layers.0.self_attn.{name}.weight"] = 1 + 0.2 * torch.randn(c.head_dim, generator=g)
    tensors["embed_tokens.weight"] = target_hf.get_input_embeddings().weight.detach().clone()
    head = target_hf.get_output_embeddings().weight.detach().clone()
    tensors["lm_head.weight"] = head + 0.05 * torch.randn(head.shape, generator=g) if own_lm_head else head
    return config, tensors


def speculators_layout(config, tensors, target_hf):
    """The same head in vLLM's ``speculators`` layout (``Eagle3Speculator``)."""
    eagle_keys = ("draft_vocab_size", "norm_before_residual", "eagle_aux_hidden_state_layer_ids", "target_hidden_size")
    layer = {k: v for k, v in config.items() if k not in eagle_keys + ("architectures", "eagle_config")}
    layer["num_hidden_layers"] = LAYERS  # as some writers leave it: the layout holds one draft layer regardless
    converted = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
                 "transformer_layer_config": layer, "speculators_config": {"algorithm": "eagle3"},
                 **{k: config[k] for k in eagle_keys if k in config}}
    renamed = {k.replace("midlayer.", "layers.0."): v for k, v in tensors.items()}
    renamed["embed_tokens.weight"] = target_hf.get_input_embeddings().weight.detach().clone()
    return converted, renamed


def save_published(directory, config, tensors, fmt="safetensors"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors")
    else:
        torch.save(tensors, directory / "pytorch_model.bin")
    return directory


class ReferenceHead:
    """The published formats' definition, in float64, one request: pairs (feature at position p,
    embedding of the token after it) through one draft layer, keys/values kept per pair."""

    def __init__(self, config, tensors, embedding):
        layer = "layers.0." if "layers.0.input_layernorm.weight" in tensors else "midlayer."
        self.c = config
        self.t = {k.replace(layer, "midlayer."): v.double() if v.is_floating_point() else v for k, v in tensors.items()}
        self.embedding, self.keys, self.values = embedding.double(), [], []

    def layer(self, features, tokens, positions):
        """Outputs ``[T, H]`` of pairs appended at ``positions`` (each sees all pairs before it)."""
        c, t, eps = self.c, self.t, self.c["rms_norm_eps"]
        heads, kv_heads, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        feature_normed = rms(features, t["midlayer.hidden_norm.weight"], eps)
        residual = feature_normed if c.get("norm_before_residual") else features
        x = torch.cat([rms(self.embedding[tokens], t["midlayer.input_layernorm.weight"], eps), feature_normed], -1)
        q = (x @ t["midlayer.self_attn.q_proj.weight"].T).view(-1, heads, d)
        k = (x @ t["midlayer.self_attn.k_proj.weight"].T).view(-1, kv_heads, d)
        v = (x @ t["midlayer.self_attn.v_proj.weight"].T).view(-1, kv_heads, d)
        if "midlayer.self_attn.q_norm.weight" in t:  # DeepSpec's Qwen3 layer: per-head q/k norms
            q, k = rms(q, t["midlayer.self_attn.q_norm.weight"], eps), rms(k, t["midlayer.self_attn.k_norm.weight"], eps)
        theta = c["rope_theta"] if "rope_theta" in c else c["rope_parameters"]["rope_theta"]
        q, k = rotate(q, positions, theta), rotate(k, positions, theta)
        start = len(self.keys)
        self.keys += list(k)
        self.values += list(v)
        keys = torch.stack(self.keys).repeat_interleave(heads // kv_heads, 1)  # [S, heads, D]
        values = torch.stack(self.values).repeat_interleave(heads // kv_heads, 1)
        scores = torch.einsum("thd,shd->hts", q, keys) / math.sqrt(d)
        visible = torch.arange(len(self.keys))[None] <= (start + torch.arange(len(tokens)))[:, None]
        attention = torch.einsum("hts,shd->thd", scores.masked_fill(~visible, -math.inf).softmax(-1), values)
        h = residual + attention.reshape(len(tokens), -1) @ t["midlayer.self_attn.o_proj.weight"].T
        y = rms(h, t["midlayer.post_attention_layernorm.weight"], eps)
        gate, up = y @ t["midlayer.mlp.gate_proj.weight"].T, y @ t["midlayer.mlp.up_proj.weight"].T
        return h + (F.silu(gate) * up) @ t["midlayer.mlp.down_proj.weight"].T

    def logits(self, d):
        """Over the target's vocabulary (``-inf`` outside the draft vocabulary)."""
        small = rms(d, self.t["norm.weight"], self.c["rms_norm_eps"]) @ self.t["lm_head.weight"].T
        full = torch.full((*small.shape[:-1], self.c["vocab_size"]), -math.inf, dtype=torch.float64)
        ids = torch.arange(small.shape[-1]) + self.t.get("d2t", torch.zeros(small.shape[-1], dtype=torch.long))
        full[..., ids] = small
        return full


def reference_draft_probs(config, tensors, target_hf, prompt, anchor, drafts):
    """Softmax of the reference head's logits at each draft step, teacher-forced on ``drafts``."""
    model = copy.deepcopy(target_hf).double()
    sequence = torch.tensor([prompt + [anchor]])
    with torch.no_grad():
        hidden = model(input_ids=sequence, output_hidden_states=True).hidden_states  # [j]: input of layer j
    if "target_layer_ids" in config:  # DeepSpec: layer outputs, hidden_states[i + 1]
        aux = [i + 1 for i in config["target_layer_ids"]]
    else:  # inputs of layers, hidden_states[j]
        aux = (config.get("eagle_aux_hidden_state_layer_ids")
               or config.get("eagle_config", {}).get("eagle_aux_hidden_state_layer_ids") or (2, LAYERS // 2, LAYERS - 3))
    n = len(prompt)
    features = torch.cat([hidden[j][0, :n] for j in aux], -1) @ tensors["fc.weight"].double().T  # [n, H]
    head = ReferenceHead(config, tensors, model.get_input_embeddings().weight.detach())
    d = head.layer(features, sequence[0, 1:], torch.arange(n))[-1]
    probs = [head.logits(d).softmax(-1)]
    for k, token in enumerate(drafts[:-1]):
        d = head.layer(d[None], torch.tensor([token]), torch.tensor([n + k]))[0]
        probs.append(head.logits(d).softmax(-1))
    return torch.stack(probs)


def eagle_pipeline(target_hf, path, gamma=4, *overrides):
    return dspark.build_pipeline({"target": {"device": "cpu", "dtype": "float64"},
                                  "drafter": {"name": "eagle3", "num_speculative_tokens": gamma, "path": str(path)}},
                                 target_model=target_hf, overrides=list(overrides))


@pytest.mark.parametrize("variant", ["default", "draft_vocab", "norm_before_residual", "aux_in_eagle_config", "bin",
                                     "speculators", "deepspec", "deepspec_own_lm_head"])
def test_imported_head_drafts_what_the_format_defines(tmp_path, variant):
    """q of every draft step equals the format's own definition (teacher-forced on the drafts)."""
    target_hf = target_model()
    if variant.startswith("deepspec"):
        config, tensors = deepspec_head(target_hf, own_lm_head=variant.endswith("own_lm_head"))
    else:
        config, tensors = published_head(
            target_hf, draft_vocab=40 if variant == "draft_vocab" else None,
            norm_before_residual=variant == "norm_before_residual",
            aux=[1, 3, 5] if variant == "aux_in_eagle_config" else None, aux_in_eagle_config=True)
    if variant == "speculators":
        config, tensors = published_head(target_hf, draft_vocab=40, norm_before_residual=True)
        path = save_published(tmp_path / "head", *speculators_layout(config, tensors, target_hf))
    else:
        path = save_published(tmp_path / "head", config, tensors, fmt="bin" if variant == "bin" else "safetensors")
    pipe = eagle_pipeline(target_hf, path)
    prompt = [5, 17, 33, 2, 90, 41, 7]
    proposal, anchor = first_proposal(pipe, prompt)
    expected = reference_draft_probs(config, tensors, target_hf, prompt, anchor, proposal.tokens[0].tolist())
    # transformers normalises in float32 even in a float64 model: its hidden states (the reference's
    # features) are ~1e-7 off dspark's; a wrong weight, norm, layer id or offset is off by ~0.1
    assert torch.allclose(proposal.probs[0], expected, atol=1e-5), (proposal.probs[0] - expected).abs().max(-1)
    if variant.startswith("deepspec"):  # its γ, its five layers, the target's LM head shared when it is a copy
        args = pipe.drafter.head.args
        assert (args.gamma, args.target_layers, args.qk_norm) == (5, (0, 1, 2, 3, 4), True)
        assert args.draft_vocab_size == (config["vocab_size"] if variant.endswith("own_lm_head") else 0)
    if variant == "draft_vocab":  # no draft outside the draft vocabulary
        ids = torch.arange(40) + tensors["d2t"]
        assert (proposal.probs[0].sum(-1) - proposal.probs[0][:, ids].sum(-1)).abs().max() < 1e-12


def test_imported_head_keeps_greedy_decoding_exact(tmp_path):
    target_hf = target_model()
    path = save_published(tmp_path / "head", *published_head(target_hf, draft_vocab=60))
    pipe = eagle_pipeline(target_hf, path, 5)
    assert_drafted_greedy_equals_transformers(pipe, target_hf, [3, 14, 15, 92, 65, 35], 24)


def test_embedding_copy_of_the_targets_is_accepted_and_another_refused(tmp_path):
    target_hf = target_model()
    config, tensors = published_head(target_hf)
    embedding = target_hf.get_input_embeddings().weight.detach().clone()
    save_published(tmp_path / "same", config, {**tensors, "embed_tokens.weight": embedding.bfloat16()})
    target = load_model(target_hf)
    assert load_eagle3(tmp_path / "same", target).args.draft_vocab_size == config["vocab_size"]
    save_published(tmp_path / "other", config, {**tensors, "embed_tokens.weight": embedding + 1})
    with pytest.raises(ValueError, match="carries an embedding .* that is not the target's"):
        load_eagle3(tmp_path / "other", target)


def test_what_dspark_cannot_run_is_refused_naming_it(tmp_path):
    target_hf = target_model()
    target = load_model(target_hf)
    cases = {
        "layers": ({"num_hidden_layers": 2}, r"num_hidden_layers 2 \(dspark's head has one draft layer\)"),
        "aux0": ({"eagle_aux_hidden_state_layer_ids": [0, 2, 4]},
                 r"eagle_aux_hidden_state_layer_ids \[0, 2, 4\] \(three ids in 1..6"),
        "rope": ({"rope_theta": 500000.0}, r"rope .*500000.* \(not the target's rotary embedding\)"),
        "vocab": ({"vocab_size": 99}, r"vocab_size 99 \(target: 101\)"),
        "bias": ({"attention_bias": True}, r"attention_bias true"),
        "eagle2": ({"eagle_config": {"use_aux_hidden_state": False}}, r"eagle_config.use_aux_hidden_state false"),
    }
    config, tensors = published_head(target_hf)
    for name, (change, message) in cases.items():
        path = save_published(tmp_path / name, {**config, **change}, tensors)
        with pytest.raises(ValueError, match="is an EAGLE-3 head dspark cannot run on this target: " + message):
            load_eagle3(path, target)
    wide = load_model(target_model(hidden_size=48, head_dim=12))
    with pytest.raises(ValueError, match=r"hidden_size 64 \(target: 48; .*head_dim 16 \(target: 12"):
        load_eagle3(save_published(tmp_path / "ok", config, tensors), wide)
    missing = {k: v for k, v in tensors.items() if k != "midlayer.hidden_norm.weight"}
    with pytest.raises(CheckpointError, match=r"missing \['midlayer.hidden_norm.weight'\], unexpected \[\]"):
        load_eagle3(save_published(tmp_path / "missing", config, missing), target)
    extra = {**tensors, "layers.1.mlp.up_proj.weight": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"unexpected \['layers.1.mlp.up_proj.weight'\]"):
        load_eagle3(save_published(tmp_path / "extra", config, extra), target)
    misshaped = {**tensors, "fc.weight": torch.zeros(64, 64)}
    with pytest.raises(CheckpointError, match=r"fc.weight: expected \(64, 192\), found \(64, 64\)"):
        load_eagle3(save_published(tmp_path / "misshaped", config, misshaped), target)
    deepspec_config, deepspec_tensors = deepspec_head(target_hf)
    last = save_published(tmp_path / "last", {**deepspec_config, "target_layer_ids": [0, 1, 2, 3, 5]}, deepspec_tensors)
    with pytest.raises(ValueError, match=r"target_layer_ids \[0, 1, 2, 3, 5\] \(ids of target layers 0..4: .* "
                                         r"DeepSpec never reads the last layer"):
        load_eagle3(last, target)
    wrong_in = {**tensors, "midlayer.self_attn.k_proj.weight": torch.zeros(32, 64)}
    with pytest.raises(CheckpointError, match=r"midlayer.self_attn.q_proj.weight \(64, 128\), midlayer.self_attn."
                                              r"k_proj.weight \(32, 64\), .* do not join into layer.wqkv.weight"):
        load_eagle3(save_published(tmp_path / "wrong_in", config, wrong_in), target)
    offsets_config, offsets = published_head(target_hf, draft_vocab=40)
    offsets["d2t"] = offsets["d2t"][:39]
    with pytest.raises(CheckpointError, match=r"d2t has shape \(39,\), expected \(40,\)"):
        load_eagle3(save_published(tmp_path / "offsets", offsets_config, offsets), target)
    small_config, small = published_head(target_hf, draft_vocab=40)
    small.pop("d2t")
    with pytest.raises(CheckpointError, match="draft vocabulary of 40 tokens but no d2t map"):
        load_eagle3(save_published(tmp_path / "nod2t", small_config, small), target)


def exportable_head(target, *, draft_vocab=40, layers=(1, 2, 4), qk_norm=False, seed=5):
    from dspark.drafters.eagle_model import Eagle3Args, Eagle3Head

    torch.manual_seed(seed)
    head = Eagle3Head(Eagle3Args.for_target(target, gamma=4, target_layers=layers, draft_vocab_size=draft_vocab,
                                            qk_norm=qk_norm))
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(15.0 if p.dim() == 2 else 1.0)  # sharper drafts that depend on their inputs
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    if draft_vocab:
        head.set_draft_vocabulary(torch.randperm(target.vocab_size)[:draft_vocab])
    return head


@pytest.mark.parametrize("draft_vocab", [40, 0])
def test_exported_head_is_the_same_head_in_the_format(tmp_path, draft_vocab):
    """A dspark head written in the EAGLE / SpecForge format: read by the format's own definition
    it drafts the dspark head's distributions, and dspark reads it back to the same weights."""
    from safetensors.torch import load_file

    from dspark.drafters.eagle3_export import export_eagle3

    target_hf = target_model()
    target = load_model(target_hf)
    head = exportable_head(target, draft_vocab=draft_vocab)
    out = export_eagle3(head, target, target_hf.config.to_dict(), tmp_path / "exported", dtype=torch.float32)
    config, tensors = json.loads((out / "config.json").read_text()), load_file(out / "model.safetensors")
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 3, 5]  # inputs of layers
    back = load_eagle3(out, target, gamma=4)
    assert back.args == head.args
    for name, value in head.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    # the dspark head's proposals, against the format's definition of the exported files
    pipe = dspark.build_pipeline({"target": {"device": "cpu", "dtype": "float64"},
                                  "drafter": {"name": "eagle3", "num_speculative_tokens": 4}},
                                 target_model=target_hf, draft_model=head)
    prompt = [5, 17, 33, 2, 90, 41, 7]
    proposal, anchor = first_proposal(pipe, prompt)
    expected = reference_draft_probs(config, tensors, target_hf, prompt, anchor, proposal.tokens[0].tolist())
    assert torch.allclose(proposal.probs[0], expected, atol=1e-5), (proposal.probs[0] - expected).abs().max()


def test_export_refuses_what_the_format_cannot_hold(tmp_path):
    from dspark.drafters.eagle3_export import export_eagle3

    target_hf = target_model()
    target = load_model(target_hf)
    with pytest.raises(ValueError, match="normalises q and k per head .* train one with model.qk_norm=false"):
        export_eagle3(exportable_head(target, qk_norm=True), target, target_hf.config.to_dict(), tmp_path / "a")
    with pytest.raises(ValueError, match="it fuses 5 target layers; the format fuses three"):
        export_eagle3(exportable_head(target, layers=(0, 1, 2, 3, 4)), target, target_hf.config.to_dict(), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_export(tmp_path, capsys):
    from dspark.cli import main
    from dspark.drafters.eagle3 import save_eagle3

    target_hf = target_model()
    target_hf.save_pretrained(tmp_path / "target")
    target = load_model(str(tmp_path / "target"))
    head = exportable_head(target)
    save_eagle3(head, tmp_path / "head")
    rc = main(["export", "eagle3", "--drafter", str(tmp_path / "head"), "--target", str(tmp_path / "target"),
               "--out", str(tmp_path / "out")])
    assert rc == 0 and "as LlamaForCausalLMEagle3" in capsys.readouterr().err
    back = load_eagle3(tmp_path / "out", target, gamma=4)
    for name, value in head.state_dict().items():  # written in bfloat16
        assert torch.equal(back.state_dict()[name], value.to(torch.bfloat16).to(value.dtype)), name
    save_eagle3(exportable_head(target, qk_norm=True), tmp_path / "qwen3_style")
    rc = main(["export", "eagle3", "--drafter", str(tmp_path / "qwen3_style"), "--target", str(tmp_path / "target"),
               "--out", str(tmp_path / "out2")])
    assert rc == 2 and "train one with model.qk_norm=false" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", ["published", "deepspec"])
def test_imported_head_on_cuda_with_graphs(tmp_path, variant):
    """On CUDA, graphed rounds give the eager rounds' tokens (greedy and seeded sampling), and greedy
    decoding with the head is plain decoding's."""
    target_hf = target_model()
    made = published_head(target_hf, draft_vocab=60) if variant == "published" else deepspec_head(target_hf)
    path = save_published(tmp_path / "head", *made)
    on_cuda = ["target.device=cuda", "target.dtype=float32"]
    eager = eagle_pipeline(target_hf, path, 5, *on_cuda, "engine.trim_idle_slots=false")  # (as graphed rounds)
    graphed = eagle_pipeline(target_hf, path, 5, *on_cuda, "engine.cuda_graphs=true")
    assert_graphs_change_nothing(eager, graphed, target_hf)


def test_a_head_that_cannot_run_is_refused_before_the_target_is_loaded(tmp_path, monkeypatch):
    """A published head and a dspark head built for another target: refused from their configs and
    the target's, no target weights read."""
    import dspark.pipeline
    from dspark.drafters.eagle3 import save_eagle3

    target_hf = target_model()
    target_hf.save_pretrained(tmp_path / "target")
    config, tensors = published_head(target_hf)
    published = save_published(tmp_path / "published", {**config, "rope_theta": 500000.0}, tensors)
    other = load_model(target_model(hidden_size=48, head_dim=12))
    save_eagle3(exportable_head(other, draft_vocab=0, layers=(0, 1, 2)), tmp_path / "other")
    monkeypatch.setattr(dspark.pipeline, "load_model", lambda *a, **k: pytest.fail("the target's weights were read"))
    for path, message in ((published, r"rope .*500000"), (tmp_path / "other", r"hidden_size 48 \(target: 64\)")):
        with pytest.raises(ValueError, match=message):
            dspark.build_pipeline({"target": {"path": str(tmp_path / "target"), "device": "cpu"},
                                   "drafter": {"name": "eagle3", "path": str(path), "num_speculative_tokens": 4}})
