"""Energy, CO2 and cost of a run: measured through NVML on CUDA (a fake NVML here), estimated and marked as such on a
CPU, and the summary's arithmetic."""

import json
import sys
import time
import types
import pytest
import torch
from conftest import run_cli, tiny
from scaletrain import energy
from scaletrain.energy import EnergyMeter, bill


class FakeNVML(types.ModuleType):
    "The calls EnergyMeter makes, with a counter that grows 5 J per read and a 250 W power reading."

    def __init__(self, counter=True):
        super().__init__("pynvml")
        self.mj, self.counter = 1_000_000, counter

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.counter:
            raise RuntimeError("not supported on this GPU")
        self.mj += 5000
        return self.mj

    def nvmlDeviceGetPowerUsage(self, handle):
        return 250_000


@pytest.fixture
def fake_cuda(monkeypatch):
    def install(counter=True, handle=True):
        nv = FakeNVML(counter)
        monkeypatch.setitem(sys.modules, "pynvml", nv)
        monkeypatch.setattr(energy, "_nvml_handle", lambda device: object() if handle else None)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
        return nv

    return install


def test_nvml_energy_counter_is_measured(fake_cuda):
    fake_cuda()
    m = EnergyMeter(torch.device("cuda", 0))
    assert m.source == "nvml-counter" and m.measured
    assert m.joules() == 5.0 and m.joules() == 10.0  # counter deltas since start, in joules


def test_nvml_power_is_integrated_when_there_is_no_counter(fake_cuda, monkeypatch):
    fake_cuda(counter=False)
    clock = iter([100.0, 102.0, 103.0])
    monkeypatch.setattr(energy.time, "perf_counter", lambda: next(clock))
    m = EnergyMeter(torch.device("cuda", 0))
    assert m.source == "nvml-power" and m.measured
    assert m.joules() == 500.0 and m.joules() == 750.0  # 250 W for 2 s, then 1 s more


def test_without_nvml_a_gpu_is_estimated_from_its_board_power(fake_cuda):
    fake_cuda(handle=False)
    m = EnergyMeter(torch.device("cuda", 0))
    assert (m.source, m.watts, m.measured) == ("estimate-gpu-board", 700.0, False)


def test_the_bill_by_hand():
    b = bill(3.6e6 * 2, device_hours=4.0, pue=1.5, grid_gco2_per_kwh=400.0, price_per_device_hour=2.0)
    assert b["device_kwh"] == 2.0 and b["facility_kwh"] == 3.0
    assert b["co2_kg"] == pytest.approx(1.2) and b["cost"] == 8.0


def test_a_cpu_run_records_an_estimated_bill(tmp_path, corpus, cache_dir):
    out = tmp_path / "runs"
    extra = ["run.pue=1.25", "run.grid_gco2_per_kwh=300", "run.cpu_watts_per_core=7", "run.price_per_device_hour=3"]
    r = run_cli("train", *tiny(corpus, cache_dir, out, *extra))
    assert r.returncode == 0, r.stderr[-2000:]
    (run,) = out.iterdir()
    s = json.loads((run / "summary.json").read_text())
    assert (
        s["energy_measured"] is False and s["energy_source"].startswith("estimated:") and "x 7 W" in s["energy_source"]
    )
    assert 0 < s["device_hours"] <= s["wall_time_s"] / 3600 * 1.001
    assert s["facility_kwh"] == pytest.approx(s["device_kwh"] * 1.25)
    assert s["co2_kg"] == pytest.approx(s["facility_kwh"] * 0.3)
    assert s["cost"] == pytest.approx(s["device_hours"] * 3)
    import os

    watts = (os.cpu_count() or 1) * 7
    assert s["device_kwh"] * 3.6e6 <= watts * s["wall_time_s"] * 1.001  # cores x W x at most the wall time
    # ... and over the same window as the device-hours: the set-up (model, data, engine) is billed too
    assert s["device_kwh"] * 3.6e6 == pytest.approx(watts * s["wall_time_s"], rel=1e-3)
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    e = [r["energy_j"] for r in recs if "energy_j" in r]
    assert len(e) == 6 and e == sorted(e) and e[0] > 0  # logged at each step, growing


def test_a_resumed_run_bills_all_its_sessions(tmp_path, corpus, cache_dir):
    "Stopped at step 3 and resumed to 6: time, energy and the bill count both sessions, never the pause between."
    out = tmp_path / "runs"
    r = run_cli("train", *tiny(corpus, cache_dir, out, "run.name=r", "train.steps=3"))
    assert r.returncode == 0, r.stderr[-2000:]
    run = out / "r"
    first = json.loads((run / "summary.json").read_text())
    time.sleep(2)  # the pause: not billed
    t1 = time.time()
    r = run_cli("train", "--resume", run, "train.steps=6")
    took = time.time() - t1  # the second session, with its process start-up
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((run / "summary.json").read_text())
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    t = [r["time"] for r in recs if "loss" in r]
    e = [r["energy_j"] for r in recs if "loss" in r]
    assert len(t) == 6 and t == sorted(t) and e == sorted(e)  # one clock and one meter over both sessions
    assert t[2] < t[3] and first["wall_time_s"] < s["wall_time_s"]
    assert 0 < s["wall_time_s"] - first["wall_time_s"] <= took  # counting the pause would add 2 s more than that
    assert s["device_kwh"] > first["device_kwh"] and s["device_hours"] > first["device_hours"]
    assert s["device_hours"] == pytest.approx(s["wall_time_s"] / 3600, rel=1e-6)  # one machine


def test_bad_bill_settings_are_one_line(tmp_path, corpus, cache_dir):
    out = tmp_path / "runs"
    r = run_cli("train", *tiny(corpus, cache_dir, out, "run.pue=0.5"))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("scaletrain: error: config: run.pue=0.5")
    assert not out.exists() or not any(out.iterdir())
