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
                  "compute per execution; for text_decoder, from its own counters: rows per step and compute per "
                  "step, the wait for the CPU turn excluded), the decoder against its memory-bandwidth floor, and "
                  "the CPU time of all server processes and of the gateway's per caption:", "",
              "| run | preprocess | vision_encoder | text_decoder | decoder s per caption | floor | ratio | "
              "server CPU s per caption | gateway CPU ms per caption | gateway share |",
              "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for service in results["service"].values():
        for row in service["rows"]:
            if row["route"] != "gateway":
                continue
            cells = [f"batch {m['mean_batch']:.1f}, queue {m['mean_queue_ms']:.0f} ms, compute "
                     f"{m['compute_ms_per_execution']:.0f} ms" for m in row["models"].values()]
            floor = row.get("decoder_floor_s_per_caption")
            against = f"{floor:.3f} | {row['decoder_s_per_caption'] / floor:.1f}x" if floor else " | "
            lines.append(f"| {row['name']} | {' | '.join(cells)} | {row['decoder_s_per_caption']:.3f} | {against} | "
                         f"{row['server_cpu_s_per_caption']:.3f} | {row['gateway_cpu_s_per_caption'] * 1e3:.1f} | "
                         f"{row['gateway_cpu_share']:.2%} |")
    repeats = [row for service in results["service"].values() for row in service.get("repeat_rows", [])]
    if repeats:
        lines += ["", "With Triton's response cache (blip-serve's default), a share of the requests repeating an image "
                      "sent before (the rows above run without it); hits as Triton counted them:", "",
                  "| run | s per caption | captions/s | p50 ms | p99 ms | cache hits |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for row in repeats:
            lines.append(f"| {row['name']} | {row['seconds_per_caption']:.3f} | {row['captions_per_second']:.2f} | "
                         f"{row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['cache_hits']} of {row['captions']} |")
    lines += _against_floor(results)
    lines += _memory_by_process(results)
    lines += ["", "| precision | server memory at rest (PSS, MB) | peak under load | weights MB | ratio at rest | "
                  "ratio at peak | short request overtakes long |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for precision, service in results["service"].items():
        total = sum(service["memory"].values()) / 2**20
        peak = sum(service.get("peak_memory", {}).values()) / 2**20
        weights = service["weights_bytes"] / 2**20
        overtaking = service.get("overtaking")
        over = ("" if not overtaking else
                f"{'yes' if overtaking['short_finished_first'] else 'NO'}: "
                f"short {overtaking['short_latency_s']:.2f} s, "
                f"sent {overtaking.get('short_sent_after_s', 3.0):.2f} s into the long one, which took "
                f"{overtaking['long_latency_s']:.2f} s ({overtaking.get('long_alone_s', float('nan')):.2f} s alone)")
        lines.append(f"| {precision} | {total:.0f} | {peak:.0f} | {weights:.0f} | {total / weights:.2f}x | "
                     f"{peak / weights:.2f}x | {over} |")
    return "\n".join(lines)


def _rates(floor: dict) -> str:
    """One line: each backend's best rate in each precision on each shape, and the bandwidth."""
    best: dict[tuple[str, str, str], dict] = {}
    for rate in floor["rates"]:
        key = (rate["shape"], rate["precision"], rate["backend"])
        if key not in best or rate["gflop_per_s"] > best[key]["gflop_per_s"]:
            best[key] = rate
    shapes: dict[str, list[str]] = {}
    for (shape, precision, backend), r in best.items():
        how = f" ({r['how']})" if (precision, backend) == ("int8", "onnxruntime") else ""
        shapes.setdefault(f"{shape} [{r['rows']}x{r['inner']}]x[{r['inner']}x{r['cols']}]", []).append(
            f"{precision} {backend} {r['gflop_per_s']:.0f}{how}")
    skipped = f"; not measured: {'; '.join(floor['skipped'])}" if floor["skipped"] else ""
    measured = "; ".join(f"{shape}: " + ", ".join(cells) for shape, cells in shapes.items())
    others = floor.get("others_busy")
    busy = (f"; other processes used {others:.0%} of the cores meanwhile (they slow what is measured, and raise "
            f"the floor)" if others is not None else "")
    return (f"Measured first, {floor['threads']} threads, GFLOP/s: {measured}; memory read "
            f"{floor['memory_bandwidth_gb_s']:.1f} GB/s{skipped}{busy}.")


def _against_floor(results: dict) -> list[str]:
    """Every service row against this machine's floor for a caption of its precision (see `floor`)."""
    if "floor" not in results:
        return []
    lines = ["", "Against this machine's floor for one caption (the encoder's FLOPs at the best matrix-product rate "
                 "measured, plus one read of the decoder's step weights a token at the read bandwidth; see "
                 "`blip_bench.floor`); the models' compute per caption from Triton's statistics, against "
                 "their parts of the floor; other: the mean latency less the models' compute.", "",
             _rates(results["floor"]), "",
             "| run | floor s (encoder + decoder) | p50 latency / floor | s per caption / floor | "
             "encoder s per caption (vs floor) | decoder s per caption (vs floor) | other s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for service in results["service"].values():
        floor = service.get("floor")
        for row in service["rows"] if floor else []:
            lines.append(f"| {row['name']} | {floor['total_s']:.3g} ({floor['encoder_s']:.3g} + "
                         f"{floor['decoder_s']:.3g}) | {row['latency_vs_floor']:.1f}x | "
                         f"{row['throughput_vs_floor']:.1f}x | {row['encoder_s_per_caption']:.3g} "
                         f"({row['encoder_vs_floor']:.1f}x) | {row['decoder_s_per_caption']:.3g} "
                         f"({row['decoder_vs_floor']:.1f}x) | {row['other_s_per_caption']:.3g} |")
    return lines


def _memory_by_process(results: dict) -> list[str]:
    """Every server process's memory (PSS, MB) at rest and at the peak, per precision."""
    lines = ["", "Memory of every server process (PSS, MB; `blip-serve` runs the gateway):", "",
             "| precision | process | at rest | at peak |", "| --- | --- | ---: | ---: |"]
    for precision, service in results["service"].items():
        peak = service.get("peak_memory", {})
        for name, value in sorted(service["memory"].items()):
            at_peak = f"{peak[name] / 2**20:.0f}" if name in peak else ""
            lines.append(f"| {precision} | {name.rsplit(' (', 1)[0]} | {value / 2**20:.0f} | {at_peak} |")
    return lines


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
