"""scripts/plot.py: where the PNG goes."""

import json

from scripts import plot


def write_metrics(folder):
    folder.mkdir()
    records = [{"step": s, "loss": 5.0 - s / 10, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_sec": 1e4, "mfu": None}
               for s in range(5)] + [{"step": 4, "val_loss": 4.8}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_without_out_the_png_goes_beside_the_metrics(tmp_path, monkeypatch, capsys):
    run, other, elsewhere = write_metrics(tmp_path / "run"), write_metrics(tmp_path / "other"), tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert plot.main([str(run)]) == 0
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.main([str(other / "metrics.jsonl"), str(run)]) == 0  # several runs: beside the first one's
    assert (other / "loss.png").exists() and list(elsewhere.iterdir()) == []
    assert capsys.readouterr().out.splitlines() == [f"wrote {run / 'loss.png'}", f"wrote {other / 'loss.png'}"]
