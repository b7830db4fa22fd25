"""The HTML report: valid, self-contained, its images real PNGs, its numbers those of metrics.jsonl."""
from __future__ import annotations

import base64
import json
import shutil
import statistics
from html.parser import HTMLParser
from pathlib import Path

import pytest

from moekit.analysis.report import model_params, run_labels, write_report
from moekit.cli.report import expand_run_dirs
from moekit.cli.report import main as report_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Checker(HTMLParser):
    """Records tag balance errors, image sources, links and the tagged metric cells."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.imgs: list[str] = []
        self.hrefs: list[str] = []
        self.cells: dict[tuple[str, str], str] = {}
        self._cell: tuple[str, str] | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        if tag == "a" and "href" in a:
            self.hrefs.append(a["href"])
        if tag == "td" and "data-metric" in a:
            self._cell = (a["data-run"], a["data-metric"])
            self.cells[self._cell] = ""
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()
        if tag == "td":
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self.cells[self._cell] += data


def _parse(path: Path) -> _Checker:
    c = _Checker()
    c.feed(path.read_text(encoding="utf-8"))
    c.close()
    return c


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def report(moe_run, dense_run, tmp_path_factory) -> tuple[Path, _Checker]:
    out = tmp_path_factory.mktemp("report")
    path = write_report([moe_run[0], dense_run[0]], out, spec_tokens=512)
    return path, _parse(path)


def test_report_html_is_valid_and_self_contained(report):
    path, page = report
    assert path.name == "report.html" and path.read_text().startswith("<!DOCTYPE html>")
    assert page.errors == [] and page.stack == []  # every tag closed, in order
    assert len(page.imgs) == 2 + 2  # loss curves, MoE vs dense; the MoE run's load heatmap and routing health
    for src in page.imgs:  # embedded: the file works when mailed on its own
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert page.hrefs, "figures link to their PNG files"
    for href in page.hrefs:
        png = path.parent / href
        assert png.is_file() and png.stat().st_size > 1000 and png.read_bytes().startswith(PNG_MAGIC)
    assert {p.name for p in path.parent.glob("*.png")} == set(page.hrefs)


def test_report_numbers_match_the_metrics(report, moe_run, dense_run):
    _, page = report
    for (run_dir, res), label in zip((moe_run, dense_run), run_labels([moe_run[0], dense_run[0]])):
        recs = _records(run_dir)
        vals = [r["val_loss"] for r in recs if "val_loss" in r]
        tps = [r["tokens_per_s"] for r in recs]
        assert page.cells[(label, "final_val_loss")] == f"{vals[-1]:.4f}" == f"{res.final_val_loss:.4f}"
        assert page.cells[(label, "final_loss")] == f"{recs[-1]['loss']:.4f}"
        assert page.cells[(label, "steps")] == str(recs[-1]["step"])
        expected_tps = statistics.median(tps[len(tps) // 10:])
        assert page.cells[(label, "tokens_per_s")] == f"{expected_tps:,.0f}" == f"{res.tokens_per_s:,.0f}"
        assert page.cells[(label, "total_params")] == f"{res.params['total_params']:,d}"
        assert page.cells[(label, "active_params")] == f"{res.params['active_params']:,d}"
        assert page.cells[(label, "collapse_warnings")] == str(sum(len(r.get("collapse", [])) for r in recs))
    moe_label = run_labels([moe_run[0], dense_run[0]])[0]
    last = _records(moe_run[0])[-10:]
    mom = statistics.fmean(r["max_over_mean_load"]["0"] for r in last)
    assert page.cells[(moe_label, "layer0_max_over_mean")] == f"{mom:.2f}"
    text = "".join(page.text)
    assert "MoE \u2212 dense final val loss" in text and "Consecutive tokens keep the same top-1 expert" in text


def test_model_params_from_config_match_the_trained_model(moe_run, dense_run):
    for run_dir, res in (moe_run, dense_run):
        cfg = json.loads((run_dir / "config.json").read_text())
        assert model_params(cfg) == res.params


def test_report_without_weights_still_renders(moe_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(moe_run[0], run)
    (run / "model.safetensors").unlink()
    path = write_report([run], tmp_path / "out", spec_tokens=256)
    page = _parse(path)
    assert page.errors == [] and "Specialization not available" in "".join(page.text)


def test_report_cli_expands_a_compare_folder(moe_run, root, capsys):
    assert expand_run_dirs([root]) == [moe_run[0], root / "dense"]
    assert report_main([str(root), "--spec-tokens", "0"]) == 0
    assert (root / "report" / "report.html").is_file()
    assert "report:" in capsys.readouterr().out
    assert report_main([str(root / "nothing-here")]) == 2
