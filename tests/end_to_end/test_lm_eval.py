"""The zero-shot evaluation path (docs/export.md "Zero-shot evaluation"): tools/run_lm_eval.py runs
lm-evaluation-harness offline on the shortened demo's HF export (`demo_export`, tests/conftest.py)
over the local tasks in examples/lm_eval/. Checks: every task reports its metrics over every
document; lm-eval's per-choice log-likelihoods equal `transformers` run directly on the export and
its acc/acc_norm follow from them; non-exports are refused; and every task the documented commands
name exists in the installed lm-eval."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "examples" / "lm_eval"
WRAPPER = ROOT / "tools" / "run_lm_eval.py"
# task -> its data file (the expected number of documents is its line count)
SMOKE = {"prores_smoke_mc": "prores_smoke_mc.jsonl", "prores_smoke_lastword": "prores_smoke_lastword.jsonl",
         "prores_smoke_text": "prores_smoke_text.jsonl"}

pytest.importorskip("lm_eval", reason="lm-eval is installed by tools/setup_env.sh")


def _run(args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(WRAPPER), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def smoke(demo_export, tmp_path_factory):
    """One offline lm-eval run of all the smoke tasks, with per-document records."""
    out = tmp_path_factory.mktemp("lm_eval") / "smoke.json"
    proc = _run([str(demo_export), "--output", str(out), "--log-samples", "--device", "cpu", "--batch-size", "4"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert "HF_HUB_OFFLINE=1" in proc.stdout and "--include_path" in proc.stdout  # the command it printed
    samples = {}
    for task in SMOKE:
        lines = (out.parent / "smoke.samples" / f"{task}.jsonl").read_text().splitlines()
        samples[task] = [json.loads(l) for l in lines]
    return json.loads(out.read_text()), samples


def _n_docs(task):
    return sum(1 for l in (TASKS / "data" / SMOKE[task]).read_text().splitlines() if l.strip())


def test_smoke_tasks_report_metrics_over_every_document(smoke):
    results, samples = smoke
    assert results["lm_eval_version"] == "0.4.13"
    for task in SMOKE:
        n = _n_docs(task)
        assert results["n-samples"][task] == {"original": n, "effective": n}
        assert len(samples[task]) == n
        assert results["n-shot"][task] == 0
    mc, last, text = (results["results"][t] for t in SMOKE)
    for key in ("acc,none", "acc_norm,none"):
        assert 0.0 <= mc[key] <= 1.0
    assert 0.0 <= last["acc,none"] <= 1.0
    assert math.isfinite(last["perplexity,none"]) and last["perplexity,none"] >= 1.0
    bpb = text["bits_per_byte,none"]
    assert math.isfinite(bpb) and bpb > 0
    # Both are exp(-total loglikelihood / bytes), in bits and in e: a check that the rolling
    # loglikelihoods were aggregated over the whole text.
    assert text["byte_perplexity,none"] == pytest.approx(2.0 ** bpb, rel=1e-9)
    assert text["word_perplexity,none"] > 1.0
    # The model's context (SEQ of the demo) is what lm-eval windowed with.
    assert results["max_length"] == json.loads((Path(results["config"]["model_args"]["pretrained"])
                                                / "config.json").read_text())["max_position_embeddings"]
    assert results["config"]["model_args"]["prefix_token_id"] == 2  # </s>, see run_lm_eval.py


def test_lm_eval_scores_equal_transformers_on_the_export(smoke, demo_export):
    """lm-eval's log P(ending | context) for every choice, recomputed with transformers; then acc and
    acc_norm recomputed from those numbers."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    results, samples = smoke
    tok = AutoTokenizer.from_pretrained(demo_export)
    model = LlamaForCausalLM.from_pretrained(demo_export, dtype=torch.float32).eval()
    max_len = model.config.max_position_embeddings
    hits, hits_norm = [], []
    for rec in samples["prores_smoke_mc"]:
        doc = rec["doc"]
        ours = []
        for i, choice in enumerate(doc["choices"]):
            ctx, cont = rec["arguments"][f"gen_args_{i}"]["arg_0"], rec["arguments"][f"gen_args_{i}"]["arg_1"]
            assert (ctx, cont) == (doc["context"], " " + choice)
            # lm-eval's split: encode context + continuation together; the continuation is whatever
            # follows the context's own tokens (SentencePiece merges across the boundary otherwise).
            ctx_ids = tok(ctx, add_special_tokens=False).input_ids
            whole = tok(ctx + cont, add_special_tokens=False).input_ids
            assert whole[:len(ctx_ids)] == ctx_ids and len(whole) <= max_len  # no truncation here
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].float(), -1)
            targets = torch.tensor(whole[len(ctx_ids):])
            ll = logp[len(ctx_ids) - 1:].gather(1, targets[:, None]).sum().item()
            theirs = float(rec["resps"][i][0][0])
            assert theirs == pytest.approx(ll, rel=1e-4, abs=1e-3), (ctx, cont)
            ours.append(theirs)
        hits.append(max(range(len(ours)), key=ours.__getitem__) == doc["label"])
        norm = [ll / len(c) for ll, c in zip(ours, doc["choices"])]  # acc_norm: per character of the ending
        hits_norm.append(max(range(len(norm)), key=norm.__getitem__) == doc["label"])
    mc = results["results"]["prores_smoke_mc"]
    assert mc["acc,none"] == pytest.approx(sum(hits) / len(hits))
    assert mc["acc_norm,none"] == pytest.approx(sum(hits_norm) / len(hits_norm))


def test_refuses_what_is_not_an_export(tmp_path):
    proc = _run([str(tmp_path / "nope")], timeout=60)
    assert proc.returncode == 2 and "is not a directory" in proc.stderr
    plain = tmp_path / "plain_hf"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    (plain / "model.safetensors").write_bytes(b"")
    proc = _run([str(plain)], timeout=60)
    assert proc.returncode == 2
    assert "not a prores-megatron Hugging Face export" in proc.stderr and "prores_export.json" in proc.stderr
    assert "tokenizer" in proc.stderr and "convert-to-hf" in proc.stderr
    proc = _run([str(plain), "--output", str(tmp_path / "r.txt")], timeout=60)
    assert proc.returncode == 2 and "give a .json file path" in proc.stderr
    proc = _run([str(plain), "--limit", "many"], timeout=60)
    assert proc.returncode == 2 and "--limit" in proc.stderr


def test_readme_commands_name_tasks_that_exist():
    """Every --tasks name in docs/export.md "Zero-shot evaluation" is in the installed lm-eval's registry
    (offline: the registry is the YAML shipped in the wheel), with the local tasks included."""
    from lm_eval.tasks import TaskManager

    readme = (ROOT / "docs" / "export.md").read_text()
    section = readme[re.search(r"^## (\d+\. )?Zero-shot evaluation", readme, re.M).start():]
    end = section.find("\n## ")
    section = section if end < 0 else section[:end]
    named = {t for arg in re.findall(r"--tasks\s+([\w,]+)", section) for t in arg.split(",")}
    paper = {"piqa", "social_iqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa",
             "race", "lambada_openai", "mmlu", "wikitext"}
    assert paper <= named, f"docs/export.md's commands lack {sorted(paper - named)}"
    known = set(TaskManager(include_path=str(TASKS)).all_tasks)
    assert named | {"prores_smoke", *SMOKE} <= known, sorted((named | {"prores_smoke", *SMOKE}) - known)
