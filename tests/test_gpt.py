"""The Modula GPT (SPEC §8), its certified bound (SPEC §7), Shakespeare data and sampling."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import NormRecorder, ascend_ratio
from omegaconf import OmegaConf

from lipschitz_lightning.data.shakespeare import CharVocab, ShakespeareDataModule
from lipschitz_lightning.errors import ConfigError
from lipschitz_lightning.core.bounds import rms_norm
from lipschitz_lightning.models import GPT
from lipschitz_lightning.optim import Role, gpt_target_norms
from lipschitz_lightning.commands.sample import load_language_model, sample
from lipschitz_lightning.commands.train import build, train

REPO = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=11, width=16, num_heads=2, num_blocks=2, seq_len=8)


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(**{**TINY, "zero_init": False, **overrides})


# ---------------------------------------------------------------- the forward pass, written out


def plain_forward(net: GPT, tokens: torch.Tensor) -> torch.Tensor:
    """SPEC §8 from the weights alone, one head and one position at a time where that is clearer."""
    cfg = net.config
    d_head = cfg.width // cfg.num_heads
    a = cfg.residual_scale / (2 * cfg.num_blocks)
    x = net.embedding.weight[tokens]  # (batch, seq, width)
    seq = tokens.shape[1]
    # RoPE: coordinate pair (i, i + d_head/2) of position p turns by p * base^(-2i / d_head)
    half = d_head // 2
    angle = torch.arange(seq)[:, None] * cfg.rope_base ** (-2 * torch.arange(half) / d_head)

    def rotate(h):
        first, second = h[..., :half], h[..., half:]
        return torch.cat([first * angle.cos() - second * angle.sin(), first * angle.sin() + second * angle.cos()], -1)

    for block in net.blocks:
        att = block.attention
        q, k, v = x @ att.q.weight.T, x @ att.k.weight.T, x @ att.v.weight.T
        heads = []
        for h in range(cfg.num_heads):
            columns = slice(h * d_head, (h + 1) * d_head)
            qh, kh, vh = rotate(q[..., columns]), rotate(k[..., columns]), v[..., columns]
            scores = qh @ kh.transpose(-1, -2) / d_head * cfg.softmax_scale
            future = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)
            heads.append(scores.masked_fill(future, -math.inf).softmax(-1) @ vh / 3)
        x = (1 - a) * x + a * (torch.cat(heads, -1) @ att.out.weight.T)
        hidden = F.gelu(x @ block.mlp.up.weight.T, approximate="tanh") / 1.1289
        x = (1 - a) * x + a * (hidden @ block.mlp.down.weight.T)
    return (x @ net.head.weight.T) * cfg.final_scale


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_forward_matches_a_plain_recomputation(attention):
    net = tiny_gpt(attention=attention, softmax_scale=2.0, final_scale=0.5)
    tokens = torch.randint(0, 11, (3, 8))
    logits = net(tokens)
    assert logits.shape == (3, 8, 11)
    torch.testing.assert_close(logits, plain_forward(net, tokens), atol=1e-5, rtol=1e-4)


def test_instrumented_forward_gives_the_same_logits_and_the_stats():
    net = tiny_gpt()
    tokens = torch.randint(0, 11, (2, 8))
    stats: dict = {}
    torch.testing.assert_close(net(tokens, stats=stats), net(tokens), atol=1e-5, rtol=1e-4)
    assert sorted(stats) == sorted(
        [f"attention/{kind}_{l}" for kind in ("max_logit", "max_abs_logit", "max_abs_logit_per_head") for l in range(2)]
        + [f"activation/{kind}_max_block{l}" for kind in ("rms", "abs") for l in range(2)]
    )
    assert sorted(net.stat_names()) == sorted(key for key in stats if "per_head" not in key)
    # the largest logit, recomputed for block 0: its input is the embedding
    att = net.blocks[0].attention
    x = net.embedding.weight[tokens]
    q = att.q(x).view(2, 8, 2, 8).transpose(1, 2)
    k = att.k(x).view(2, 8, 2, 8).transpose(1, 2)
    from lipschitz_lightning.models.gpt import apply_rotary

    q, k = apply_rotary(q, net.rotary_cos, net.rotary_sin), apply_rotary(k, net.rotary_cos, net.rotary_sin)
    logits = (q @ k.transpose(-1, -2)) / 8
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    assert float(stats["attention/max_logit_0"]) == pytest.approx(float(logits[..., causal].max().detach()), rel=1e-5)


def test_a_later_token_never_changes_earlier_logits():
    net = tiny_gpt()
    tokens = torch.randint(0, 11, (4, 8))
    changed = tokens.clone()
    changed[:, 5:] = (changed[:, 5:] + 3) % 11
    before, after = net(tokens), net(changed)
    torch.testing.assert_close(before[:, :5], after[:, :5], atol=0, rtol=0)
    assert not torch.allclose(before[:, 5:], after[:, 5:])


def test_zero_init_starts_at_zero_logits_and_unit_rms_tokens():
    net = GPT(**TINY, zero_init=True)
    assert torch.count_nonzero(net(torch.randint(0, 11, (2, 8)))) == 0
    token_rms = net.embedding.weight.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(token_rms, torch.ones(11))
    for name, weight in net.named_matrices().items():
        expected = 0.0 if name.startswith(("w", "mlp_out", "out")) else 1.0
        assert rms_norm(weight) == pytest.approx(expected, abs=1e-5), name


def test_layer_names_and_bound_follow_the_reference(ref_transformer_bound):
    entry = ref_transformer_bound
    norms, num_blocks = entry["rms_to_rms_norms"], entry["num_blocks"]
    net = GPT(**{**TINY, "num_blocks": num_blocks, "softmax_scale": entry["softmax_scale"]})
    assert sorted(net.layer_norms()) == sorted(norms)
    assert net.paper_formula_bound(norms) == pytest.approx(entry["bound"], rel=1e-6)


@pytest.mark.parametrize("mass", [16.0, 5.0])
def test_target_norms_per_role_follow_spec(mass):
    net = GPT(**TINY, blocks_mass=mass)
    expected = gpt_target_norms(mass)
    M = mass + 2
    by_name = {spec.name: spec for spec in net.param_specs()}
    assert by_name["embed"].role == Role.EMBEDDING and by_name["embed"].target_norm == pytest.approx(1 / M)
    assert by_name["out"].role == Role.HEAD and by_name["out"].target_norm == pytest.approx(1 / M)
    for l in range(2):
        for name in ("q", "k", "v"):
            assert by_name[f"{name}{l}"].target_norm == pytest.approx(mass / M)
        for name in ("w", "mlp_in", "mlp_out"):
            assert by_name[f"{name}{l}"].target_norm == pytest.approx(mass / (3 * M))
    assert expected["qkv"] == pytest.approx(mass / M)
    # every parameter has exactly one spec
    assert len(by_name) == len(list(net.parameters()))


def test_normalisation_layers_void_the_certificate_tanh_keeps_it():
    assert GPT(**TINY, layernorm_substitute="rmsnorm").certified_bound() == math.inf
    assert GPT(**TINY, layernorm_substitute="layernorm").certified_bound() == math.inf
    assert math.isfinite(GPT(**TINY, layernorm_substitute="tanh").certified_bound())


# ---------------------------------------------------------------- the bound is a bound


def token_rms_max(x: torch.Tensor) -> torch.Tensor:
    """The sequence norm of the bound: the largest per-token RMS."""
    return x.pow(2).mean(-1).sqrt().amax(-1)


def into_unit_ball(x: torch.Tensor) -> torch.Tensor:
    """Every token vector pulled back to RMS at most 1: the embedding's ball, where the bound holds."""
    return x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1.0)


@pytest.mark.parametrize("layernorm_substitute", ["none", "tanh"])
def test_no_pair_of_embedded_inputs_beats_the_certified_bound(layernorm_substitute):
    net = tiny_gpt(seed=1, softmax_scale=4.0, layernorm_substitute=layernorm_substitute)
    with torch.no_grad():  # norms well above 1, so attention's input-dependent term matters
        for weight in net.named_matrices().values():
            weight.mul_(1.8)
    for p in net.parameters():
        p.requires_grad_(False)
    # per unit of embedding norm: the network after the embedding, inputs with token RMS <= 1
    bound = net.certified_bound({**net.layer_norms(), "embed": 1.0})

    def ratio(x, y):
        return token_rms_max(net.forward_embedded(x) - net.forward_embedded(y)) / token_rms_max(x - y)

    generator = torch.Generator().manual_seed(0)
    x = into_unit_ball(torch.randn(256, 8, 16, generator=generator))
    far = into_unit_ball(torch.randn(256, 8, 16, generator=generator))
    near = into_unit_ball(x + 1e-3 * torch.randn(256, 8, 16, generator=generator))
    sampled = max(ratio(x, far).max(), ratio(x, near).max())

    searched = ascend_ratio(ratio, x[:64], x[:64] + 0.05 * torch.randn(64, 8, 16, generator=generator),
                            steps=150, lr=2e-2, project=into_unit_ball)
    print(f"\nGPT ({layernorm_substitute}): bound {bound:.4g}, sampled {float(sampled):.4g}, searched {float(searched):.4g}")
    assert 0 < float(sampled) <= float(searched) * 1.5
    assert max(float(sampled), float(searched)) <= bound * (1 + 1e-5)


# ---------------------------------------------------------------- data


@pytest.fixture(scope="module")
def shakespeare(shared_data_dir) -> ShakespeareDataModule:
    data = ShakespeareDataModule(str(shared_data_dir), seq_len=256, batch_size=4, val_batch_size=64)
    data.prepare_data()
    data.setup()
    return data


def test_vocab_split_and_validation_windows(shakespeare):
    text = shakespeare.path.read_text()
    assert len(text) == 1_115_394
    assert len(shakespeare.vocab) == 65 and shakespeare.vocab.chars == "".join(sorted(set(text)))
    assert len(shakespeare.splits["val"]) == 435  # the whole last 10%, non-overlapping windows of 256
    x, y = shakespeare.splits["val"][torch.tensor([0, 434])]
    split = int(0.9 * len(text))
    assert shakespeare.vocab.decode(x[0]) == text[split : split + 256]
    assert shakespeare.vocab.decode(y[0]) == text[split + 1 : split + 257]
    assert shakespeare.vocab.decode(y[1])[-1] == text[split + 435 * 256]
    assert sum(len(batch) for batch in shakespeare.val_dataloader().sampler) == 435


def test_training_windows_lie_in_the_training_text_and_depend_on_seed_and_step(shakespeare):
    text = shakespeare.path.read_text()
    split = int(0.9 * len(text))
    first = next(iter(shakespeare.train_dataloader()))
    again = next(iter(shakespeare.train_dataloader()))
    torch.testing.assert_close(first, again)
    for x, y in zip(*first):
        window = shakespeare.vocab.decode(x)
        start = text.find(window)
        assert 0 <= start < split - 256
        assert shakespeare.vocab.decode(y) == text[start + 1 : start + 257]


def test_vocab_rejects_unknown_characters():
    vocab = CharVocab.from_text("abc")
    assert vocab.decode(vocab.encode("cab")) == "cab"
    with pytest.raises(ValueError, match="'z'"):
        vocab.encode("az")


# ---------------------------------------------------------------- the pipeline


def gpt_overrides(shared_data_dir: Path, *extra: str) -> list[str]:
    return [
        "experiment=shakespeare_gpt_cpu",
        f"paths.data_dir={shared_data_dir}",
        "data.seq_len=32",
        "data.batch_size=16",
        "data.val_batch_size=512",
        "model.net.width=32",
        "model.net.num_blocks=2",
        *extra,
    ]


def test_muon_soft_cap_keeps_every_matrix_and_embedding_in_its_ball(make_config, shared_data_dir, tmp_path):
    w_max = 1.0  # the q, k, v matrices start at norm 1 and Muon's steps push them up at once
    cfg = make_config(*gpt_overrides(shared_data_dir, f"constraint.w_max={w_max}", "trainer.max_steps=30", "trainer.val_check_interval=30"))
    run = build(cfg)
    recorder = NormRecorder()
    run.trainer.callbacks.append(recorder)
    train(cfg, run)
    assert len(recorder.history) == 30
    matrices = max(v for step in recorder.history for k, v in step.items() if k != "embed")
    embedding = max(step["embed"] for step in recorder.history)
    print(f"\nGPT, Muon + soft cap at w_max {w_max}: largest matrix norm {matrices:.5f}, largest token RMS {embedding:.5f}")
    assert matrices <= w_max * 1.001
    assert embedding <= 1.0 + 1e-5
    assert matrices >= 0.9 * w_max  # the cap binds, so the check is not vacuous


def test_tiny_gpt_learns_shakespeare_and_logs_bound_and_stats(make_config, shared_data_dir, tmp_path):
    out = tmp_path / "run"
    cfg = make_config(*gpt_overrides(shared_data_dir, "trainer.max_steps=40", "trainer.val_check_interval=20"), output_dir=out)
    run = build(cfg)
    summary = train(cfg, run)
    # zero init starts every prediction at ln 65 = 4.174; the head's target norm (1/18) makes the
    # first steps slow at this size, so "falls" is a modest margin
    assert summary["val/loss"] < math.log(65) - 0.05
    assert summary["lipschitz/bound"] == pytest.approx(run.module.net.certified_bound(), rel=1e-6)
    metrics = (out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("attention/max_logit_1", "activation/rms_max_block0", "activation/abs_max_block1", "norm/q0", "norm/embed"):
        assert key in metrics, key


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="TorchInductor compiles C++ on a CPU: no C++ compiler on this machine")
@pytest.mark.slow
def test_compiled_forward_trains_like_the_eager_one(make_config, shared_data_dir, tmp_path):
    # model.compile=true (README, Speed) must change how fast, not what: the same losses as eager,
    # validation included, and a checkpoint with the network's keys only
    summaries = {}
    for compiled in (False, True):
        overrides = gpt_overrides(shared_data_dir, "trainer.max_steps=4", "trainer.val_check_interval=4", f"model.compile={compiled}")
        summaries[compiled] = train(make_config(*overrides, output_dir=tmp_path / str(compiled)))
    assert summaries[True]["val/loss"] == pytest.approx(summaries[False]["val/loss"], rel=1e-4)
    assert summaries[True]["lipschitz/bound"] == pytest.approx(summaries[False]["lipschitz/bound"], rel=1e-4)  # the weights
    state = torch.load(summaries[True]["checkpoint"], weights_only=False)["state_dict"]
    assert not any("_orig_mod" in key or "compiled" in key for key in state)


@pytest.fixture(scope="module")
def tiny_checkpoints(shared_data_dir, tmp_path_factory, tiny_cifar):
    """A constrained (Muon + soft cap) and an unconstrained (AdamW) tiny GPT checkpoint."""
    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR, QUIET_TRAINER

    paths = {}
    for name, extra in {"constrained": [], "unconstrained": ["optimizer=adamw", "constraint=none"]}.items():
        out = tmp_path_factory.mktemp(name)
        overrides = gpt_overrides(shared_data_dir, "trainer.max_steps=4", "trainer.val_check_interval=4", *extra)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[*overrides, *QUIET_TRAINER, f"paths.output_dir={out}"])
        paths[name] = train(cfg)["checkpoint"]
    return paths


def sample_config(ckpt_path: str, **overrides):
    return OmegaConf.create({"ckpt_path": ckpt_path, "prompt": "ROMEO:", "num_tokens": 25, "temperature": 0.8, "seed": 0, "device": "cpu", **overrides})


@pytest.mark.parametrize("kind", ["constrained", "unconstrained"])
def test_sampling_gives_the_requested_characters_from_the_vocab(tiny_checkpoints, kind):
    text = sample(sample_config(tiny_checkpoints[kind]))
    model, vocab = load_language_model(tiny_checkpoints[kind])
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 25
    assert set(text) <= set(vocab.chars) and len(vocab) == 65
    assert sample(sample_config(tiny_checkpoints[kind])) == text  # seeded
    assert len(sample(sample_config(tiny_checkpoints[kind], temperature=0, num_tokens=3))) == len("ROMEO:") + 3


@pytest.mark.slow
def test_sampling_from_the_command_line(tiny_checkpoints):
    result = subprocess.run(
        [sys.executable, "-m", "lipschitz_lightning.sample", f"ckpt_path={tiny_checkpoints['constrained']}", "prompt=KING", "num_tokens=10"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n").startswith("KING") and len(result.stdout.rstrip("\n")) >= 4


def test_prompt_outside_the_vocab_is_a_clear_error(tiny_checkpoints):
    with pytest.raises(ConfigError, match=r"prompt .*'é'"):
        sample(sample_config(tiny_checkpoints["constrained"], prompt="héllo"))


def test_a_non_language_model_checkpoint_is_refused(make_config, tmp_path):
    checkpoint = train(make_config("trainer.max_steps=2", "trainer.val_check_interval=2"))["checkpoint"]
    with pytest.raises(ConfigError, match="ckpt_path"):
        load_language_model(checkpoint)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.net.num_heads=3", "model.net.num_heads"),
        ("data.seq_len=200000", "data.seq_len"),
        ("model.net.layernorm_substitute=batchnorm", "model.net.layernorm_substitute"),
        ("data.vocab_size=64", "data.vocab_size"),
    ],
)
def test_bad_gpt_settings_are_rejected_before_any_work(make_config, shared_data_dir, tmp_path, override, key):
    cfg = make_config(*gpt_overrides(shared_data_dir, override), output_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as error:
        train(cfg)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_benchmark_times_the_gpt_pipeline_against_a_plain_loop(shared_data_dir):
    result = subprocess.run(
        # Hydra overrides first: --methods takes every word after it
        [sys.executable, "-m", "lipschitz_lightning.benchmark", f"paths.data_dir={shared_data_dir}", "data.seq_len=32",
         "data.batch_size=8", "model.net.width=32", "--experiment", "shakespeare_gpt_cpu", "--steps", "8", "--repeats", "1",
         "--methods", "none"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert numbers["items_per_step"] == 8 * 32  # tokens
    assert numbers["pipeline_final_loss"] == pytest.approx(numbers["plain_final_loss"], rel=1e-4)
    assert numbers["ratio"] > 0 and "none" in numbers["methods"]
    # the guard against a step that slows down as training goes on: subnormal floats, flushed by the
    # benchmark as by train.py (the certified MLP ran ~6x slower after 1000 steps without the flush)
    assert numbers["plain_subnormals_at_the_end"] == 0
    assert numbers["plain_first_quarter_s_per_step"] > 0 and numbers["plain_last_quarter_s_per_step"] > 0
