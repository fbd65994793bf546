"""The benchmark suites on the CPU: every suite is registered, takes --tokens and checks its
arguments before any GPU work, and every record in benchmarks/ follows the schema."""
import copy
import inspect
import json
from pathlib import Path

import pytest

from msa_cupy import _bench
from msa_cupy._bench import SUITES, harness

ROOT = Path(__file__).resolve().parents[1]
RECORDS = sorted((ROOT / "benchmarks").glob("*.json"))
EXPECTED = {"decode", "paper", "plain", "selection", "select_variants", "sparse", "decode_host", "jax_decode", "prefill_plan"}


class _NoGPU(Exception):
    pass


@pytest.fixture
def no_gpu(monkeypatch):
    """Any GPU work raises _NoGPU: a suite that gets that far has accepted its arguments."""
    def refuse(*args, **kwargs):
        raise _NoGPU

    for name in ("cupy", "ceilings", "card", "time_ms", "random", "dense_attention_ms"):
        monkeypatch.setattr(harness, name, refuse)
    monkeypatch.setattr("msa_cupy.testing.device_randn", refuse)


class _Report:
    def __init__(self):
        self.meta, self.rows = {"suites": []}, []

    def __call__(self, name, **fields):
        self.rows.append(dict(name=name, **fields))


CEILINGS = {"copy_GBps": 4000.0, "matmul_TFLOPs": 750.0, "matmul_via": "torch bf16"}


def test_every_suite_is_registered():
    assert set(SUITES) == EXPECTED
    assert all(callable(run) and run.__doc__ for run in SUITES.values())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_suite_accepts_tokens(name, no_gpu):
    run = SUITES[name]
    assert "tokens" in inspect.signature(run.run).parameters
    report = _Report()
    with pytest.raises(_NoGPU):  # past the argument checks, stopped at the first GPU call
        run(report, CEILINGS, tokens=[4096, 8192])
    assert report.meta["suites"] == [name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("tokens, error, match", [(["4096"], TypeError, "ints"), ([0], ValueError, ">= 1"),
                                                  ([], ValueError, "at least one"), (4096, TypeError, "sequence"),
                                                  ([True], TypeError, "ints")])
def test_bad_tokens_rejected_before_gpu_work(name, no_gpu, tokens, error, match):
    with pytest.raises(error, match=f"tokens.*{match}"):
        SUITES[name](_Report(), CEILINGS, tokens=tokens)


def test_sparse_suite_takes_schedules(no_gpu):
    with pytest.raises(_NoGPU):
        SUITES["sparse"](_Report(), CEILINGS, tokens=[4096], schedules=["kv", "tile", "auto"], caches=())
    with pytest.raises(ValueError, match="schedules"):
        SUITES["sparse"](_Report(), CEILINGS, tokens=[4096], schedules=["tiles"])


@pytest.mark.parametrize("name", ["paper", "sparse"])
def test_prefill_suites_take_patterns(name, no_gpu):
    with pytest.raises(_NoGPU):
        SUITES[name](_Report(), CEILINGS, tokens=[4096], patterns=["coherent", "needle"])
    with pytest.raises(ValueError, match="patterns"):
        SUITES[name](_Report(), CEILINGS, tokens=[4096], patterns=["smooth"])


def test_check_tokens_normalises():
    assert _bench.check_tokens((4096, 2**20)) == (4096, 1048576)


@pytest.mark.parametrize("path", RECORDS, ids=[p.name for p in RECORDS])
def test_records_follow_the_schema(path):
    record = harness.validate_record(json.loads(path.read_text()))
    assert set(record["suites"]) <= EXPECTED
    assert path.name.startswith("-".join(record["suites"]) + "-")


def test_records_exist():
    assert RECORDS, "benchmarks/ holds the measured records"
    assert not sorted((ROOT / "benchmarks").glob("*.py")), "benchmarks/ holds records only: suites live in msa_cupy/_bench"


def _good():
    return json.loads(RECORDS[0].read_text())


@pytest.mark.parametrize("edit, match", [
    (lambda r: r.pop("card"), "card must be an object"),
    (lambda r: r["card"].pop("name"), "card.name"),
    (lambda r: r.pop("commit"), "commit"),
    (lambda r: r.update(commit="unknown"), "commit"),
    (lambda r: r.update(date="2026-11-26"), "date"),
    (lambda r: r.update(date="yesterday"), "date"),
    (lambda r: r.pop("ceilings"), "ceilings"),
    (lambda r: r["ceilings"].update(copy_GBps="fast"), "ceilings.copy_GBps"),
    (lambda r: r.update(schema=0), "schema"),
    (lambda r: r.update(suites=[]), "suites"),
    (lambda r: r["results"].append({"tokens": 1}), r"results\[\d+\] must have a name"),
    (lambda r: r["results"].append({"name": "x", "ms": [1.0]}), r"results\[\d+\]\.ms"),
    (lambda r: r["results"].append({"name": "x", "pattern": "smooth"}), r"results\[\d+\]\.pattern"),
    (lambda r: r["results"].append({"name": "x", "overlap": 1.5}), r"results\[\d+\]\.overlap"),
    (lambda r: r["results"].append({"name": "x", "union_t8": -1}), r"results\[\d+\]\.union_t8"),
])
def test_validator_rejects(edit, match):
    record = copy.deepcopy(_good())
    edit(record)
    with pytest.raises(ValueError, match=match):
        harness.validate_record(record)


def test_report_writes_a_valid_record(tmp_path, monkeypatch):
    monkeypatch.setenv("MSA_CUPY_COMMIT", "0123abc")
    report = harness.Report()
    report.meta.update(card=_good()["card"], ceilings=CEILINGS)
    report.meta["suites"].append("plain")
    report("plain attention 32K", tokens=32768, total_ms=1.5, speedup_vs_dense=None)
    report.write(tmp_path / "plain-card.json")
    harness.validate_record(json.loads((tmp_path / "plain-card.json").read_text()))


def test_host_pieces_are_timed_without_a_gpu():
    """python -m msa_cupy._bench.host_cpu: the one-call program it binds is the stage functions'."""
    from msa_cupy._bench import host_cpu

    program = host_cpu._one_call_program()
    assert [launch.block for launch in program.launches][0] == (256, 1, 1)
    assert {"q", "k", "v", "iq", "ik", "out", "lse", "ids", "cu_q", "cu_k", "k_len", "width", "partial", "part_o",
            "part_lse", "select_count", "decode_count"} == set(program.slots)
    assert host_cpu._us(lambda: None, number=10, repeat=2) >= 0
