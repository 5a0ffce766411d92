"""Export trained checkpoints to Hugging Face and back: logits, greedy generation, tokenizer, files, round trip.

Six tiny models are trained for a few steps (`python -m memtrain.train`, as users run it): the baseline (no meta tokens,
global attention, MHA, untied head), a Hymba-style model (meta tokens, windowed + global layers, GQA, tied), an
RMT and the Titans MAC, MAG and MAL models (the last four with the meta tokens and windows of the
tiny config). All have vocabulary padding (512 -> 576). TP = 2 and PP = 2 checkpoints are in the slow tests at
the end.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.e2e.test_train import train

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
MODELS = {
    "baseline": ["--set", "model.num_meta_tokens=0", "--set", "model.window=0", "--set", "model.n_kv_heads=4",
                 "--set", "model.tie_embeddings=false"],
    "meta": ["--set", "model.num_meta_tokens=4", "--set", "model.window=16", "--set", "model.global_layers=[-1]",
             "--set", "model.n_kv_heads=2", "--set", "model.tie_embeddings=true"],
}
TITANS = ["--set", "model.titans.segment_len=16", "--set", "model.titans.chunk_size=8", "--set",
          "model.titans.memory_heads=2"]
MODELS.update({
    "rmt": ["--set", "model.memory=\"rmt\"", "--set", "model.rmt.segment_len=16", "--set", "model.rmt.num_memory=4",
            "--set", "model.tie_embeddings=true"],
    "mac": ["--set", "model.memory=\"mac\"", *TITANS],
    # linear memory: the native deep (depth >= 2) chunked kernel gives NaN in fp32 at this init (deep memories
    # are compared in tests/unit/test_export_memory.py)
    "mag": ["--set", "model.memory=\"mag\"", *TITANS],
    "mal": ["--set", "model.memory=\"mal\"", *TITANS, "--set", "model.titans.conv_size=0"],
})
COMMON = ["--set", "model.vocab_pad_multiple=96", "--set", "data.batch_size=4", "--set", "schedule.warmup_steps=2"]
PROMPT = "def main(argv):\n    "


def native_model(run: Path):
    """The training code's model with the merged weights of the run's newest checkpoint."""
    from memtrain.model import build_model
    from memtrain.train.hf import convert, merge
    ckpt = merge.resolve_checkpoint(run)
    meta = merge.read_meta(ckpt)
    cfg = convert.build_config(meta["config"], str(ckpt))
    model = build_model(cfg.model)
    model.load_state_dict(merge.merge_model_state(ckpt, meta))
    return model.eval()


def load_hf(path: Path, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, **kw).eval()
    return model, AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)


def native_greedy(model, ids: list[int], n: int = 64) -> list[int]:
    """Greedy decoding by the native model: a full forward over the whole sequence for every new token."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def hf_greedy(model, ids: list[int], n: int = 64) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=3)
    return out[0, len(ids):].tolist()


def max_logit_diff(native, hf, vocab: int) -> float:
    ids = torch.randint(0, vocab, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (native(ids).logits - hf(ids).logits).abs().max().item()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The in-process models are tiny: one thread is much faster than contended intra-op threads on 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def exported(tiny_dataset, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{name: (run dir, fp32 export dir)} for the single-process models."""
    from memtrain.train.export_hf import export
    from concurrent.futures import ThreadPoolExecutor
    root = tmp_path_factory.mktemp("export")
    # three training processes at a time: each spends most of its few seconds starting up (imports, one thread)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda name: train(tiny_dataset, root / f"run_{name}", *COMMON, *MODELS[name], steps=STEPS),
                      MODELS))
    return {name: (root / f"run_{name}", export(root / f"run_{name}", root / f"hf_{name}")) for name in MODELS}


@pytest.mark.parametrize("name", MODELS)
def test_logits_and_greedy_generation_match_native(exported, name):
    run, hf_dir = exported[name]
    native = native_model(run)
    hf, tok = load_hf(hf_dir)
    diff = max_logit_diff(native, hf, native.cfg.vocab_size)
    print(f"{name}: max |logits native - HF| = {diff:.3g}")
    assert diff <= 1e-4
    ids = tok(PROMPT)["input_ids"]
    assert hf_greedy(hf, ids) == native_greedy(native, ids)


@pytest.mark.parametrize("name", ["meta", "rmt", "mal"])
def test_left_padded_batch_generates_as_each_row_alone(exported, name):
    hf, tok = load_hf(exported[name][1])
    prompts = ["import os\nimport sys\n", "x", "class Foo:\n    def bar(self):"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert tok.padding_side == "left" and (batch["attention_mask"] == 0).any()
    kw = dict(max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    rows = hf.generate(**batch, **kw)[:, batch["input_ids"].shape[1]:]
    for prompt, row in zip(prompts, rows):
        assert row.tolist() == hf_greedy(hf, tok(prompt)["input_ids"], 40)


def test_tokenizer_matches_the_training_tokenizer(exported, tiny_dataset):
    from memtrain.data.tokenizer import Tokenizer
    _, tok = load_hf(exported["baseline"][1])
    native = Tokenizer(str(tiny_dataset / "tokenizer.model"))
    text = "def f(x):\n\tif x  >  12:  # héllo ✓ <s> </s>\n        return None\n\n"
    ids = tok(text)["input_ids"]
    assert ids == native.encode(text)
    assert tok.decode(ids) == native.decode(ids) == text
    assert (tok.eos_token_id, tok.pad_token_id, len(tok)) == (2, 3, native.vocab_size)


def test_fast_tokenizer_needs_no_remote_code_and_gives_the_training_ids(exported, tiny_dataset):
    """tokenizer.json: AutoTokenizer without remote code gives the sentencepiece ids on real code (every 10th
    stdlib file, like the corpus) and on edge cases: leading spaces, text after a newline, "<s>" as text."""
    import glob
    import os
    import sysconfig

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from memtrain.data.tokenizer import Tokenizer
    fast = AutoTokenizer.from_pretrained(str(exported["baseline"][1]), trust_remote_code=False)
    assert isinstance(fast, PreTrainedTokenizerFast)
    native = Tokenizer(str(tiny_dataset / "tokenizer.model"))
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True))[::10]
    texts = [open(f, encoding="utf-8", errors="replace").read() for f in files[:150]]
    texts += ["  leading", "\nfirst line empty", "def f(<s>, </s>): ☃ 😀 \t\t x=12345", ""]
    for text in texts:
        ids = native.encode(text)
        assert fast(text)["input_ids"] == ids, text[:80]
        assert fast.decode(ids) == native.decode(ids)
    assert (fast.eos_token_id, fast.pad_token_id, fast.padding_side) == (2, 3, "left")


def test_export_directory_contents(exported):
    _, hf_dir = exported["meta"]
    conf = json.loads((hf_dir / "config.json").read_text())
    assert conf["auto_map"]["AutoModelForCausalLM"] == "modeling_memtrain.MemtrainForCausalLM"
    assert conf["vocab_size"] == 512  # padding (576) trimmed
    assert conf["layer_types"] == ["sliding_attention", "full_attention"] and conf["sliding_window"] == 16
    assert conf["memtrain"]["step"] == STEPS and conf["memtrain"]["config"]["model"]["num_meta_tokens"] == 4
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once
    assert json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"] == 2
    card = (hf_dir / "README.md").read_text()
    assert "meta tokens | 4" in card and "memory | none" in card and "window 16, global" in card
    from memtrain.train.hf import TEMPLATE_FILES
    for name in ("meta", "mag"):
        hf_dir = exported[name][1]
        for f in TEMPLATE_FILES:
            text = (hf_dir / f).read_text()
            assert "from train" not in text and "megatron" not in text and "from model" not in text
    conf = json.loads((hf_dir / "config.json").read_text())  # mag
    assert conf["memory"] == "mag" and conf["memory_config"]["chunk_size"] == 8
    assert "memory | mag" in (hf_dir / "README.md").read_text()


def test_bf16_export_with_several_shards(exported, tmp_path):
    run, fp32_dir = exported["baseline"]
    out = tmp_path / "bf16"
    proc = subprocess.run([sys.executable, "-m", "memtrain.train.export_hf", "--checkpoint", str(run), "--out", str(out),
                           "--dtype", "bf16", "--max-shard-size", "100KB"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    import transformers
    # transformers 5 loads in the config's dtype by default; 4.x needs torch_dtype="auto" for that (docs/export.md)
    hf16, _ = load_hf(out, **({} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": "auto"}))
    hf32, _ = load_hf(fp32_dir)
    assert hf16.dtype == torch.bfloat16
    ids = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        diff = (hf16(ids).logits.float() - hf32(ids).logits).abs().max().item()
    assert diff < 0.25, diff  # bf16 rounding of the weights, nothing structural


@pytest.mark.parametrize("name", MODELS)
def test_import_then_export_gives_identical_weights(exported, tmp_path, name):
    from safetensors.torch import load_file
    from memtrain.train.export_hf import export
    from memtrain.train.import_hf import import_hf
    run, hf_dir = exported[name]
    ckpt = import_hf(hf_dir, tmp_path / "ckpt")
    again = export(ckpt, tmp_path / "again")

    def weights(d: Path) -> dict[str, torch.Tensor]:
        files = set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values())
        return {k: v for f in files for k, v in load_file(str(d / f)).items()}
    a, b = weights(hf_dir), weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the imported checkpoint is a memtrain-checkpoint-v1 the native model loads strictly, same logits
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        assert torch.equal(native_model(ckpt)(ids).logits, native_model(run)(ids).logits)


def test_trainer_resumes_from_an_imported_checkpoint(exported, tiny_dataset, tmp_path):
    from memtrain.train.import_hf import import_hf
    ckpt = import_hf(exported["meta"][1], tmp_path / "ckpt")
    train(tiny_dataset, tmp_path / "cont", *COMMON, *MODELS["meta"], "--resume", str(ckpt), steps=2)


def _launcher() -> list[str]:
    from tests.dist.spawn import free_port
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_tensor_parallel_checkpoint_exports_exactly(tiny_dataset, tmp_path, name):
    """TP = 2 training -> export; HF logits equal the TP = 2 native forward, greedy equals native greedy."""
    from tests.dist.spawn import run_ranks
    from memtrain.train.export_hf import export
    run = tmp_path / "run"
    train(tiny_dataset, run, *COMMON, *MODELS[name], "--set", "parallel.tp=2", steps=2, launcher=_launcher())
    hf, tok = load_hf(export(run, tmp_path / "hf"))
    ids = torch.randint(0, 512, (3, 48), generator=torch.Generator().manual_seed(1))
    tp_logits = run_ranks(_tp_forward, 2, str(run), ids)[0]
    with torch.no_grad():
        diff = (tp_logits - hf(ids).logits).abs().max().item()
    print(f"{name} TP=2: max |logits native TP=2 - HF| = {diff:.3g}")
    assert diff <= 1e-4
    prompt = tok(PROMPT)["input_ids"]
    assert hf_greedy(hf, prompt) == native_greedy(native_model(run), prompt)


@pytest.mark.slow
# every kind DeepSpeed's pipeline runs (RMT has its own schedule: the next test); mac, meta: tied embedding
@pytest.mark.parametrize("name", [m for m in MODELS if m != "rmt"])
def test_pipeline_parallel_checkpoint_exports_exactly(tiny_dataset, tmp_path, name):
    """PP = 2 training -> export. The sharded checkpoint's full weights (each stage wrote its own) load strictly;
    HF logits and greedy generation equal the native model with those weights."""
    from memtrain.train.export_hf import export
    from memtrain.train.hf import merge
    run = tmp_path / "run"
    train(tiny_dataset, run, *COMMON, *MODELS[name], "--set", "parallel.pp=2", steps=2, launcher=_launcher())
    ckpt = merge.resolve_checkpoint(run)
    meta = merge.read_meta(ckpt)
    assert meta["layout"]["pp"] == 2
    merged = merge.merge_model_state(ckpt, meta)
    native = native_model(run)  # strict load: the stages together saved every weight
    assert set(merged) == set(native.state_dict()) - {k for k, _ in native.named_buffers()}
    hf, tok = load_hf(export(run, tmp_path / "hf"))
    diff = max_logit_diff(native, hf, native.cfg.vocab_size)
    print(f"{name} PP=2: max |logits native - HF| = {diff:.3g}")
    assert diff <= 1e-4
    prompt = tok(PROMPT)["input_ids"]
    assert hf_greedy(hf, prompt) == native_greedy(native, prompt)


@pytest.mark.slow
def test_rmt_pipeline_checkpoint_exports_exactly(tiny_dataset, tmp_path):
    """RMT trained at PP = 2 (memtrain/launch/rmt_pipeline.py) -> export: the stages' rank files together hold every weight
    (the tied embedding bit-identical on first and last stage), HF logits and greedy generation equal native."""
    from memtrain.train.export_hf import export
    from memtrain.train.hf import merge
    run = tmp_path / "run"
    train(tiny_dataset, run, *COMMON, *MODELS["rmt"], "--set", "parallel.pp=2", steps=2, launcher=_launcher())
    ckpt = merge.resolve_checkpoint(run)
    meta = merge.read_meta(ckpt)
    assert meta["layout"]["pp"] == 2
    native = native_model(run)  # load_state_dict is strict: the merge covers every parameter
    hf, tok = load_hf(export(run, tmp_path / "hf"))
    diff = max_logit_diff(native, hf, native.cfg.vocab_size)
    print(f"rmt PP=2: max |logits native - HF| = {diff:.3g}")
    assert diff <= 1e-4
    prompt = tok(PROMPT)["input_ids"]
    assert hf_greedy(hf, prompt) == native_greedy(native, prompt)


def _tp_forward(rank: int, world: int, run: str, ids: torch.Tensor) -> torch.Tensor:
    """On each of 2 gloo ranks: the native TP model from this rank's own shard; full-vocabulary logits."""
    from megatron.core import parallel_state

    from memtrain.launch.tensor_parallel import MegatronFactory
    from memtrain.model import build_model
    from memtrain.launch.tensor_parallel import partition_dim
    from memtrain.train.hf import convert, merge
    from memtrain.train.sharded import Pieces, load_tensors, placement
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world, create_gloo_process_groups=False)
    ckpt = merge.resolve_checkpoint(Path(run))
    cfg = convert.build_config(merge.read_meta(ckpt)["config"], run)
    model = build_model(cfg.model, MegatronFactory()).eval()
    # this rank's TP shard of every weight, read from the sharded checkpoint (only the rectangles it needs)
    load_tensors(ckpt / "state", {f"model.{n}": Pieces.whole(placement(p.shape, partition_dim(p), rank, world), p.data)
                                  for n, p in model.named_parameters()})
    with torch.no_grad():
        return model.factory.gather_logits(model(ids).logits)[..., : cfg.model.vocab_size]
