"""`blip-bench run`'s results as markdown tables and a plot of throughput against concurrency."""

from __future__ import annotations

import json
from pathlib import Path


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        f"{s['images']} images, {s['beams']} beams, exactly {s['tokens']} new tokens, {results['cpu_threads']} CPU "
        f"threads; memory read bandwidth {results['memory_bandwidth_gb_s']:.1f} GB/s",
        "",
        "| how | s per caption | captions/s | p50 ms | p99 ms | vs transformers batch 1 | captions equal |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    one_by_one = results["transformers"][0]["captions_per_second"]
    again = [results["transformers_again"]] if "transformers_again" in results else []
    for row in results["transformers"] + again:
        lines.append(f"| {row['name']} | {row['seconds_per_caption']:.3f} | {row['captions_per_second']:.2f} | "
                     f"{row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['captions_per_second'] / one_by_one:.2f}x | |")
    for service in results["service"].values():
        for row in service["rows"]:
            same = (f"{row['identical_share']:.0%} to {row['identical_to']}" if "identical_share" in row else "")
            lines.append(f"| {row['name']} | {row['seconds_per_caption']:.3f} | {row['captions_per_second']:.2f} | "
                         f"{row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['speedup']:.2f}x | {same} |")
    lines += ["", "Triton's statistics, through the gateway (mean requests per execution; queue per request; "
                  "compute per execution), the decoder against its memory-bandwidth floor, and the CPU time of "
                  "all server processes and of the gateway's per caption:", "",
              "| run | preprocess | vision_encoder | text_decoder | decoder s per caption | floor | ratio | "
              "server CPU s per caption | gateway CPU ms per caption | gateway share |",
              "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for service in results["service"].values():
        for row in service["rows"]:
            if row["route"] != "gateway":
                continue
            cells = [f"batch {m['mean_batch']:.1f}, queue {m['mean_queue_ms']:.0f} ms, compute "
                     f"{m['compute_ms_per_execution']:.0f} ms" for m in row["models"].values()]
            floor = row["decoder_floor_s_per_caption"]
            lines.append(f"| {row['name']} | {' | '.join(cells)} | {row['decoder_s_per_caption']:.3f} | "
                         f"{floor:.3f} | {row['decoder_s_per_caption'] / floor:.1f}x | "
                         f"{row['server_cpu_s_per_caption']:.3f} | {row['gateway_cpu_s_per_caption'] * 1e3:.1f} | "
                         f"{row['gateway_cpu_share']:.2%} |")
    lines += ["", "| precision | server memory at rest (PSS, MB) | peak under load | weights MB | ratio at rest | "
                  "ratio at peak | short request overtakes long |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for precision, service in results["service"].items():
        total = sum(service["memory"].values()) / 2**20
        peak = sum(service.get("peak_memory", {}).values()) / 2**20
        weights = service["weights_bytes"] / 2**20
        overtaking = service.get("overtaking")
        over = ("" if not overtaking else
                f"{'yes' if overtaking['short_finished_first'] else 'NO'}: short {overtaking['short_latency_s']:.2f} s, "
                f"long {overtaking['long_latency_s']:.2f} s")
        lines.append(f"| {precision} | {total:.0f} | {peak:.0f} | {weights:.0f} | {total / weights:.2f}x | "
                     f"{peak / weights:.2f}x | {over} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for precision, service in results["service"].items():
        for route, style in (("gateway", "-o"), ("triton", "--s")):
            rows = [r for r in service["rows"] if r["route"] == route]
            axis.plot([r["concurrency"] for r in rows], [r["captions_per_second"] for r in rows], style,
                      label=f"service {precision} via {route}")
    for row in results["transformers"]:
        axis.axhline(row["captions_per_second"], linestyle=":", color="grey" if row["batch"] == 1 else "black",
                     label=f"transformers, batch {row['batch']}")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("concurrent clients")
    axis.set_ylabel("captions per second")
    s = results["settings"]
    axis.set_title(f"{Path(s['checkpoint']).name}: {s['beams']} beams, {s['tokens']} tokens")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write(results: dict, output: Path) -> str:
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=2, default=str))
    text = markdown(results)
    (output / "results.md").write_text(text + "\n")
    plot(results, output / "throughput.png")
    return text
