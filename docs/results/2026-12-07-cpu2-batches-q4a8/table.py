"""The README's table from e2e.json: each configuration's speed relative to our verifier alone
at the same batch size (tok/s with prefill; the two rounds' ratios in brackets), and whether
each adaptive row reaches the best of its rule's fixed gammas and no speculation within the
rounds' spread. Usage: python table.py [e2e.json]"""
import json
import pathlib
import sys

here = pathlib.Path(__file__).parent
data = json.loads(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else here / "e2e.json").read_text())
rows = {(r["name"], r["batch"]): r for r in data["rows"]}
batches = sorted({b for _, b in rows})


def rounds(name, b):
    r = rows.get((name, b))
    return None if r is None else r["extra"]["round_tokens_per_s"]


def ratio(name, b):
    """(total ratio, [per-round ratios]) against ours:verifier at batch b."""
    r, v = rows.get((name, b)), rows[("ours:verifier", b)]
    if r is None:
        return None
    total = (r["tokens"] / r["wall_s"]) / (v["tokens"] / v["wall_s"])
    per = [x / y for x, y in zip(rounds(name, b), rounds("ours:verifier", b))]
    return total, per


def cell(name, b):
    got = ratio(name, b)
    if got is None:
        return ""
    total, per = got
    return f"{total:.3f} ({min(per):.3f}–{max(per):.3f})"


names = list(dict.fromkeys(n for n, _ in rows))
print("| configuration | " + " | ".join(f"batch {b}" for b in batches) + " |")
print("| --- |" + " ---: |" * len(batches))
print("| ours:verifier, tok/s | " + " | ".join(
    f"{rows[('ours:verifier', b)]['tokens'] / rows[('ours:verifier', b)]['wall_s']:.2f}"
    for b in batches) + " |")
for n in names:
    if n != "ours:verifier":
        print(f"| {n} | " + " | ".join(cell(n, b) for b in batches) + " |")

# adaptive against max(best fixed gamma, no speculation) of its rule and temperature
groups = {"ours:spec greedy, goodput gamma (confidence)": ["ours:spec greedy",
                                                           "ours:spec greedy, gamma 2"],
          "ours:spec T=1, goodput gamma (confidence)": ["ours:spec T=1", "ours:spec T=1, gamma 2"],
          "ours:token_v3 a=0.3 T=1, goodput gamma (confidence)": [
              "ours:token_v3 a=0.3 T=1", "ours:token_v3 a=0.3 T=1, gamma 2"]}
print("\n| adaptive row | batch | adaptive | best other (which) | adaptive − best, per round |")
print("| --- | ---: | ---: | --- | --- |")
for a, fixed in groups.items():
    others = fixed + (["ours:verifier"] if "spec " in a else [])  # (token_v3 has no gamma 0)
    for b in batches:
        if ratio(a, b) is None:
            continue
        best = max((o for o in others if ratio(o, b) is not None), key=lambda o: ratio(o, b)[0])
        diff = [x - y for x, y in zip(ratio(a, b)[1], ratio(best, b)[1])]
        print(f"| {a} | {b} | {ratio(a, b)[0]:.3f} | {ratio(best, b)[0]:.3f} ({best}) | "
              + ", ".join(f"{d:+.3f}" for d in diff) + " |")
