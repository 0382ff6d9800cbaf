"""Print a Markdown table (median ms per iteration, ratios, peak memory) from a pytest-benchmark JSON file.

    python benchmarks/summarize.py .benchmarks/.../0001_xxx.json
"""
import json
import sys


def main(path: str) -> None:
    data = json.load(open(path))
    rows = {}
    for b in data["benchmarks"]:
        info = b["extra_info"]
        rows.setdefault(info["size"], {})[info["path"]] = (b["stats"]["median"] * 1e3, info.get("iteration_mib"))
    m = data["machine_info"]
    print(f"Machine: {m.get('cpu', {}).get('brand_raw', '?')}, torch {data['benchmarks'][0]['extra_info']['torch']}, "
          f"{data['benchmarks'][0]['extra_info']['threads']} threads\n")
    print("| size | fused ms | eager ms | compile ms | eager/fused | compile/fused | fused MiB | eager MiB | fused/eager mem |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in sorted(rows):
        r = rows[size]
        f, e, c = (r.get(k, (None, None)) for k in ("fused", "eager", "compile"))

        def fmt(v, spec=".0f"):
            return "–" if v is None else format(v, spec)

        ratio = lambda a, b: None if a is None or b is None else a / b  # noqa: E731
        print(f"| {size}² | {fmt(f[0])} | {fmt(e[0])} | {fmt(c[0])} | {fmt(ratio(e[0], f[0]), '.2f')} | "
              f"{fmt(ratio(c[0], f[0]), '.2f')} | {fmt(f[1])} | {fmt(e[1])} | {fmt(ratio(f[1], e[1]), '.2f')} |")


if __name__ == "__main__":
    main(sys.argv[1])
