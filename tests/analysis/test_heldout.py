"""``prores-megatron heldout`` (docs/usage.md): the demo's held-out loss against an independent
computation (the demo's own Hugging Face export, run by transformers on windows cut here by hand
from the validation documents), the validation-document rounding, and refusals."""

import json
import math
import sys

import numpy as np
import pytest

from prores_megatron.analysis import cli
from prores_megatron.analysis.heldout_command import validation_documents


def test_validation_documents_round_like_megatron():
    # 90,10,0 of 1096 documents: round(986.4) = 986 .. 1096; 95,5,0 of 200: 190 .. 200;
    # 949,50,1 of 1000 (weights normalised): round(949) .. round(999) = 949 .. 999.
    assert validation_documents(1096, "90,10,0") == (986, 1096)
    assert validation_documents(200, "95,5,0") == (190, 200)
    assert validation_documents(1000, "949,50,1") == (949, 999)
    with pytest.raises(cli.UsageError, match="--split '100,0,0'"):
        validation_documents(100, "100,0,0")


def test_heldout_matches_transformers_on_the_demo_export(short_demo):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import LlamaForCausalLM

    result = json.loads((short_demo / "prores" / "heldout.json").read_text())
    saved_split = "90,10,0"  # demo_cpu.sh --split
    assert result["split"] == saved_split and result["iteration"] == 6
    # The demo slice has 200 documents: validation = round(0.9 * 200) .. 200 = 180 .. 199.
    assert result["documents"] == [180, 200]
    data = IndexedDataset(str(short_demo / "data" / "demo_text_document"))
    tokens = np.concatenate([np.asarray(data[i], dtype=np.int64) for i in range(180, 200)])
    seq = 32  # the shortened demo's SEQ
    n = (len(tokens) - 1) // seq
    assert result["val_windows"] == n and result["val_tokens"] == n * seq
    # The export folded alpha at step 6 (= the checkpoint's iteration): the model the heldout scored.
    model = LlamaForCausalLM.from_pretrained(short_demo / "hf", torch_dtype=torch.float32).eval()
    losses = []
    with torch.no_grad():
        for k in range(n):
            window = torch.from_numpy(tokens[k * seq:(k + 1) * seq + 1]).unsqueeze(0)
            logits = model(window[:, :-1]).logits.float()
            losses.append(torch.nn.functional.cross_entropy(logits[0], window[0, 1:]).item())
    assert result["window_losses"] == pytest.approx(losses, abs=2e-4)
    mean = float(np.mean(losses))
    assert result["val_loss"] == pytest.approx(mean, abs=1e-4)
    assert result["val_se"] == pytest.approx(float(np.std(losses, ddof=1)) / math.sqrt(n), rel=1e-3)
    # Per-layer activation norms from the model's own layers, alpha from its buffers (T = 1, 6 steps).
    assert result["alpha"] == [1.0] * 4
    with torch.no_grad():
        hidden = model(torch.from_numpy(tokens[:n * seq].reshape(n, seq)), output_hidden_states=True).hidden_states
    norms = [float(h.norm(dim=-1).mean()) for h in hidden[1:]]
    # hidden_states[-1] has the final norm applied by transformers; compare the others exactly.
    assert result["resid_norm"][:-1] == pytest.approx(norms[:-1], rel=1e-3)


def test_heldout_refusals(tmp_path, short_demo, capsys):
    missing = tmp_path / "nothing"
    assert cli.main(["heldout", "--checkpoint", str(short_demo / "prores" / "ckpt"), "--out", str(tmp_path / "r.json"),
                     "--data-path", str(missing)]) == 2
    assert f"--data-path {missing}: no {missing}.idx" in capsys.readouterr().err
    assert cli.main(["heldout", "--checkpoint", str(short_demo / "prores" / "ckpt"), "--out",
                     str(tmp_path / "no_dir" / "r.json")]) == 2
    assert "--out" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
