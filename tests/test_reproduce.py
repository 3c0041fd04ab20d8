"""`cilbench reproduce`: manifests, the report against published values, and the cost model."""
from __future__ import annotations

import csv
import json
import tomllib
from pathlib import Path

import pytest

from cilbench import cost
from cilbench.benchmark import get_benchmark, load_benchmark_files
from cilbench.cli import main
from cilbench.registry import METHODS
from cilbench.reproduce import load_manifest

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "benchmarks" / "reproduce"
README_RUNS = REPO / "results" / "runs" / "readme"


@pytest.fixture(autouse=True)
def benchmarks():
    load_benchmark_files()


def test_the_care_manifest_holds_every_cell_of_tables_1_to_3_as_published():
    manifest = load_manifest(MANIFESTS / "care.toml")
    cells = {(c.benchmark, c.method, c.metric): c for c in manifest.cells}
    rows = list(csv.DictReader((REPO / "cilbench" / "reference" / "published.csv").open()))
    for row in rows:   # an independent transcription of the same tables
        for metric, key in (("avg", "avg_inc_acc"), ("last", "last_acc")):
            assert cells[(row["benchmark"], row["method"], metric)].published == float(row[key])
    table1 = [c for c in manifest.cells if c.table == "Table 1"]
    assert len(table1) == 12 * 4 * 2          # 12 rows x 4 sequences x (Ā, A_B), methods.md §1.10
    assert {c.backbone for c in manifest.cells} == {"vit_base_patch16_224.augreg_in21k"}
    care_ob1k = [c for c in table1 if c.method == "care"]
    assert all("run.precision=fp16" in c.sets for c in care_ob1k)   # the released OB-1K amp


def test_the_dry_run_lists_every_table_1_cell_with_its_runs_and_hours(capsys):
    assert main(["reproduce", str(MANIFESTS / "care.toml"), "--dry-run", "--cells", "Table 1",
                 "--calibrate", "/nonexistent"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for cell in load_manifest(MANIFESTS / "care.toml").cells:
        if cell.table == "Table 1":
            assert cell.id in out
    for bench in ("ob1k-100", "ob1k-200", "ob1k-151", "ob1k-301"):
        for method in ("care", "l2p", "dualprompt", "coda-prompt", "aper"):
            assert f"{bench}__{method}__s1993" in out
    assert "no cilbench implementation of MOS" in out
    assert "20 runs for 40 runnable cells (56 not runnable)" in out and "FLOPs at 50 TFLOP/s" in out


def test_the_pilot_manifest_resolves_every_cell_and_labels_the_ambiguous_ones():
    manifest = load_manifest(MANIFESTS / "pilot.toml")
    assert "backbone.normalize=off" in manifest.sets          # PILOT feeds [0, 1]
    for cell in manifest.cells:
        assert cell.method in METHODS.names() and get_benchmark(cell.benchmark)
        if cell.benchmark.startswith("inr"):
            assert "split" in cell.note
    assert len({c.id for c in manifest.cells}) == len(manifest.cells) == 9 * 2 * 2 + 9 * 2


def _manifest(path: Path, cells: list[tuple[str, str, float]]) -> Path:
    text = '[manifest]\nname = "probe"\npaper = "a run of this test"\ntolerance = 0.0\nsets = ["run.threads=1"]\n'
    for method, metric, value in cells:
        text += (f'\n[[cell]]\ntable = "T"\nmethod = "{method}"\nbenchmark = "tiny-3"\nbackbone = "embedded-tiny"\n'
                 f'metric = "{metric}"\npublished = {value}\n')
    path.write_text(text)
    return path


def test_a_manifest_of_values_from_a_run_reproduces_exactly_and_a_wrong_value_is_reported(tmp_path, capsys):
    assert main(["run", "--method", "simplecil", "--bench", "tiny-3", "--out", str(tmp_path / "first"),
                 "--set", "run.threads=1"]) == 0
    metrics = json.loads((tmp_path / "first" / "tiny-3__simplecil__s1993" / "summary.json").read_text())["metrics"]
    avg, last = round(metrics["avg_inc_acc"], 2), round(metrics["last_acc"], 2)
    good = _manifest(tmp_path / "good.toml", [("simplecil", "avg", avg), ("simplecil", "last", last),
                                              ("mos", "last", 64.27)])
    capsys.readouterr()
    assert main(["reproduce", str(good), "--out", str(tmp_path / "again")]) == 0
    report = list(csv.DictReader((tmp_path / "again" / "sweeps" / "reproduce-probe" / "reproduce.csv").open()))
    assert [r["verdict"] for r in report] == ["within", "within", "no cilbench implementation of mos"]
    assert report[0]["ours"] == f"{avg:.2f} ± 0.00 (n=1)" and report[0]["delta"] == "+0.00"
    assert (tmp_path / "again" / "sweeps" / "reproduce-probe" / "reproduce.png").exists()
    wrong = _manifest(tmp_path / "wrong.toml", [("simplecil", "last", round(last + 0.01, 2))])
    assert main(["reproduce", str(wrong), "--out", str(tmp_path / "again")]) == 1   # the run is reused
    report = list(csv.DictReader((tmp_path / "again" / "sweeps" / "reproduce-probe" / "reproduce.csv").open()))
    assert report[0]["verdict"] == "outside" and report[0]["delta"] == "-0.01"


@pytest.mark.parametrize("bench, methods, band", [
    # measured: 0.93, 1.01, 0.97 of the recorded time at 20 tasks; 0.56 (simplecil) to 1.30 (aper) at 301
    ("synth-20", ("simplecil", "l2p", "samoe"), (0.75, 1.25)),
    ("synth-301", ("simplecil", "aper", "joint", "finetune", "samoe"), (0.5, 2.0)),
])
def test_the_cost_model_calibrated_on_synth_10_predicts_longer_runs(bench, methods, band):
    """Per-image seconds from the stored synth-10 runs, applied to a longer benchmark's workload, against
    the stored runs' recorded time."""
    for method in methods:
        cal = cost.calibrate([README_RUNS / f"synth-10__{method}__s1993"], method, "embedded-tiny", "cpu")
        target = README_RUNS / f"{bench}__{method}__s1993"
        config = tomllib.loads((target / "config.toml").read_text())
        summary = json.loads((target / "summary.json").read_text())
        method_cls = METHODS.get(method)
        work = cost.workload(get_benchmark(bench), method_cls, method_cls.Config(**config["method_config"]),
                             config["run"].get("shots", 0), config["run"].get("eval_every", 1))
        predicted = cost.estimate(work, cal, "embedded-tiny", "cpu").seconds
        actual = summary["learn_s_total"] + summary["eval_s_total"]
        assert band[0] < predicted / actual < band[1], (method, predicted, actual)


def test_the_flops_model_counts_a_vit_b16_forward_as_published():
    """ViT-B/16 at 224 px: ≈ 17.6 G multiply-adds per image (spec methods.md §1.9; timm's model card 17.6 GMACs)."""
    assert cost.vit_flops_per_image("vit_base_patch16_224.augreg_in21k") / 2 == pytest.approx(17.6e9, rel=0.01)
    work = cost.Workload(train_image_epochs=1000, eval_images=500)
    est = cost.estimate(work, None, "vit_base_patch16_224.augreg_in21k", "cuda", tflops=10)
    assert est.seconds == pytest.approx(cost.vit_flops_per_image("vit_base_patch16_224.augreg_in21k") * 3500 / 10e12)
