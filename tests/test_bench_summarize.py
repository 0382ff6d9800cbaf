"""benchmarks/summarize.py: the Markdown tables made from a pytest-benchmark JSON file."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("bench_summarize", ROOT / "benchmarks" / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(name, group, median, **info):
    return dict(name=name, group=group, stats=dict(median=median, min=median * 0.9, rounds=3), extra_info=info)


DATA = dict(
    machine_info=dict(dip=dict(cpu=dict(model="Intel Xeon", avx512f=True, amx_bf16=True), torch="2.11.0+cu130",
                               torch_cuda="13.0", gpu="NVIDIA H100 80GB HBM3", threads=2, device="cuda",
                               commit="0123456789abcdef")),
    benchmarks=[_bench("fused", "it 512", 0.010, path="fused", size=512, device="cuda"),
                _bench("eager", "it 512", 0.016, path="eager", size=512, device="cuda"),
                _bench("compile", "it 512", 0.012, path="compile", size=512, device="cuda")],
)


def test_summary_names_the_machine_and_the_ratios(tmp_path):
    summarize = _module()
    text = summarize.summarize(DATA)
    first = text.splitlines()[0]
    assert "Intel Xeon (avx512f, amx_bf16)" in first and "GPU NVIDIA H100 80GB HBM3" in first
    assert "torch 2.11.0+cu130 (CUDA 13.0)" in first and "device cuda" in first and "commit 0123456789" in first
    assert "| 512² | cuda | 10.0 | 16.0 | 12.0 | 1.60 | 1.20 |" in text
    assert "| eager | 16.00 | 14.40 | 3 | 1.60 |" in text


def test_main_writes_the_table_beside_the_json(tmp_path, capsys):
    summarize = _module()
    path = tmp_path / "run.json"
    path.write_text(json.dumps(DATA))
    assert summarize.main([str(path)]) == 0
    assert (tmp_path / "run.md").read_text() == summarize.summarize(DATA)
    assert "written to" in capsys.readouterr().out
