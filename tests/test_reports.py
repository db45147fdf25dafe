"""The reporting scripts turn metric CSVs into the tables and figures of the model card."""

from scripts import evaluation_table, training_summary


def test_training_summary_picks_best_epoch_and_plots(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text(
        "epoch,seconds,val_mpe_PD,val_mpe_T1,val_mpe_T2,val_mpe_sum,val_psnr_PD,val_psnr_T1,val_psnr_T2\n"
        "2,1800,0.1,0.2,0.3,0.6,20.0,18.0,19.0\n4,3600,0.05,0.1,0.15,0.3,25.0,22.0,23.0\n"
        "6,5400,0.06,0.1,0.16,0.32,26.0,23.0,24.0\n"
    )
    training_summary.main([str(run), "--names", "PDPE", "--out", str(tmp_path / "docs" / "training")])
    text = (tmp_path / "docs" / "training.md").read_text()
    assert "| PDPE | 6 | 1.50 | 4 | 10.0 | 15.0 | 5.0 | 22.00 | 23.00 | 25.00 |" in text
    assert (tmp_path / "docs" / "training.png").stat().st_size > 5_000


def test_evaluation_table_formats_every_metric_per_map(tmp_path):
    names = [f"{m}_{k}" for m in ("psnr", "ssim", "mae", "mpe") for k in ("T1", "T2", "PD")]
    (tmp_path / "metrics.csv").write_text("".join(f"{n},{i / 10}\n" for i, n in enumerate(names)))
    evaluation_table.main([f"model, split={tmp_path}", "--out", str(tmp_path / "table.md")])
    cells = (tmp_path / "table.md").read_text().splitlines()[2].split(" | ")
    assert cells[1:] == ["0.00", "0.10", "0.20", "0.300", "0.400", "0.500", "0.6000", "0.7000", "0.8000",
                         "0.900", "1.000", "1.100 |"]  # fmt: skip
