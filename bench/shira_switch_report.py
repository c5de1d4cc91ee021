"""Labels and the Markdown report of ``shira_switch.py``.

The report leads with the like-for-like rows: adapterkit SHiRA switching to an adapter whose
originals it has not cached yet ("first visit", exact) and with ``exact=False`` (adds and subtracts,
as peft's merge/unmerge does), each against peft SHiRA and peft LoRA. Then the trade-off: switching
between adapters seen before, from adapterkit's cache of originals, and the host memory each variant
holds while fused. The goals, the detailed tables, loading and the checks follow.
"""

from __future__ import annotations

from typing import Any

from shira_common import header, ms, ratio, table, times, verdict

AK_SHIRA, AK_LORA, PEFT_LORA, PEFT_SHIRA = "adapterkit SHiRA", "adapterkit LoRA", "peft LoRA", "peft SHiRA"
AK_SHIRA_COLD = "adapterkit SHiRA, first visit"
AK_SHIRA_INEXACT = "adapterkit SHiRA, exact=False"
OURS = (AK_SHIRA_COLD, AK_SHIRA_INEXACT, AK_SHIRA)  # like for like first, then the cached path
FLOOR, FLOOR_ADD, FLOOR_CACHED = "floor", "floor + add", "floor, originals cached"
FLOORS = {FLOOR: "floor", FLOOR_ADD: "add", FLOOR_CACHED: "cached"}
GOALS = {PEFT_LORA: 30.0, PEFT_SHIRA: 10.0}  # adapterkit SHiRA at least this many times faster
FLOOR_GOAL = 1.5  # adapterkit SHiRA within this factor of the floor
HEADLINE = {  # label: (what it is, like for like?)
    AK_SHIRA_COLD: ("first switch to each adapter: originals gathered, exact unfuse", "like for like"),
    AK_SHIRA_INEXACT: ("fuse adds, switch/unfuse subtract (as peft), nothing saved", "like for like"),
    AK_SHIRA: ("switching between adapters seen before: originals from the cache", "trade-off: memory"),
    FLOOR: ("floor: the least an exact sparse switch does", "reference"),
}


def mib(value: int | None) -> str:
    return "—" if value is None else f"{value / 2**20:.1f}"


def headline(report: dict[str, Any], key: str) -> list[str]:
    """Like for like first (vs peft SHiRA and peft LoRA), then the cached path, with memory and exactness."""
    res, sanity = report["results"][key]["switch"], report["sanity"].get(key, {})
    held, unfused = res.get("held_bytes", {}), sanity.get("unfused", {})
    rows = []
    for label, (what, kind) in HEADLINE.items():
        if label not in res:
            continue
        med = res[label]["median"]
        exact = unfused.get(label, {}).get("bit_identical")
        rows.append([f"{label} ({what})", kind, ms(med), times(ratio(res.get(PEFT_SHIRA, {}).get("median"), med)),
                     times(ratio(res.get(PEFT_LORA, {}).get("median"), med)), mib(held.get(label)),
                     "—" if exact is None else "yes" if exact else "no"])
    return table(["switch fused a → fused b", "comparison", "median [ms]", "peft SHiRA / this", "peft LoRA / this",
                  "host memory held while fused [MiB]", "unfuse bit-exact"], rows, "llrrrrl")


def switch_table(res: dict[str, Any]) -> list[str]:
    sw = res["switch"]
    ak_med = sw[AK_SHIRA]["median"]
    rows = []
    for label in (*OURS, *FLOORS, AK_LORA, PEFT_SHIRA, PEFT_LORA):
        if label not in sw:
            continue
        s = sw[label]
        rows.append([label, ms(s["median"]), ms(s["min"]), ms(s["max"]), times(ratio(s["median"], ak_med))])
    lines = table(["switch fused a → fused b", "median [ms]", "min", "max", "× adapterkit SHiRA's (cached) time"], rows)
    for label, parts in sw.get("breakdown", {}).items():
        lines.insert(-1, f"\n{label} breakdown (medians): " + ", ".join(f"{k.split('.', 1)[1]} {ms(v['median'])} ms"
                                                                         for k, v in parts.items()) + ".")
    return lines


def load_table(res: dict[str, Any]) -> list[str]:
    rows = []
    for scenario, title in (("while_a_fused", "'a' fused before"), ("nothing_fused", "nothing fused before")):
        m = res[scenario]
        for label in ("adapterkit", "adapterkit, PEFT-format file", "adapterkit, ignore_fingerprint", "peft"):
            rows.append([title, label, ms(m[label]["median"]), times(ratio(m["peft"]["median"], m[label]["median"]))])
    lines = table(["load 'c' into fused weights", "variant", "median [ms]", "peft / this"], rows, "llrr")
    bd = res["while_a_fused"]["peft_breakdown"]
    lines.insert(-1, "\npeft breakdown with 'a' fused (medians): " + ", ".join(
        f"{k.split('_', 1)[1]} {ms(v['median'])} ms" for k, v in bd.items()) + ".")
    return lines


def markdown(report: dict[str, Any]) -> list[str]:
    p = report["meta"]["params"]
    lines = header(report, "SHiRA switching benchmark: adapterkit vs peft (LoRA, SHiRA) and the floor")
    shape = f"{p['layers']}× Linear {p['width']}×{p['width']}, r={p['r']} ({p['r'] * 2 * p['width']:,} SHiRA entries per layer)"
    for key in ("fp32", "bf16"):
        if key in report["results"]:
            lines += [f"## Like for like first: {shape}, {key}", ""] + headline(report, key)
    lines.insert(-1, "\nHost memory: adapterkit's own count (saved originals at the fused entries and the cache of "
                 "originals gathered for each adapter visited); peft keeps none. The cache is built on every exact "
                 "switch, so \"first visit\" holds it too once it has switched.")
    lines += ["## Goals (fp32 stack)", ""]
    lines += table(["goal", "value", "verdict"], [[k, times(g["value"]), verdict(g["met"])] for k, g in report["goals"].items()], "lrl")
    lines.insert(-1, "\nFor scale, the same ratios for the floors (what any exact scatter switch could reach here): "
                 + "; ".join(f"{k} {times(v)}" for k, v in report["floor_speedups"].items()) + ".")
    for key in ("fp32", "bf16"):
        if key in report["results"]:
            lines += [f"## All variants: {shape}, {key}", ""] + switch_table(report["results"][key])
    if "load" in report["results"].get("fp32", {}):
        lines += ["## Loading a new adapter straight into the fused weights (fp32)", ""]
        lines += load_table(report["results"]["fp32"]["load"])
    return lines + checks_table(report)


def checks_table(report: dict[str, Any]) -> list[str]:
    """The asserted checks: outputs vs the dense reference, bit-exact fused weights and unfuse."""
    rows = []
    for key in ("fp32", "bf16"):
        s = report["sanity"].get(key)
        for label, e in (s or {}).get("after_switches", {}).items():
            again, unfused = s["after_one_more_switch"][label], s["unfused"][label]
            exact = e["weights_bit_identical_to_reference"] and again["weights_bit_identical_to_reference"]
            rows.append([key, label, f"{max(e['output_rel_err'], again['output_rel_err']):.2g}", "yes" if exact else "no",
                         "yes" if unfused["bit_identical"] else "no", f"{unfused['max_abs_drift']:.2g}",
                         f"{100 * unfused['changed_fraction']:.1f}%"])
    lines = ["## Checks (asserted for adapterkit's exact paths and the floor; recorded for exact=False and peft)", ""]
    lines += table(["stack", "variant", "output rel. err. vs dense W + ΔW", "fused weights bit-identical to W + ΔW",
                    "unfused weights bit-identical to base", "max drift after unfuse", "base entries drifted"], rows, "llrrrrr")
    load = report["sanity"].get("fp32_load")
    if load:
        lines += ["Loading 'c' into fused weights: max |fused weight − (W + ΔW_c)| = "
                  + ", ".join(f"{k.replace(' fused weights - (W + ΔW_c), max abs', '')}: {v:.2g}" for k, v in load.items()), ""]
    return lines
