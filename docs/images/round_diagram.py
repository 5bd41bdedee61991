"""Draw docs/images/round.svg, the picture of one decoding round: python docs/images/round_diagram.py"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.hashsalt"] = "dspark"  # stable ids: regenerating gives the same file
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

W, GAP, X0, H = 0.9, 0.12, 2.3, 0.6
GREY, ANCHOR, DRAFT, OK, BAD, RECOVERED, TARGET = "#e6e6e6", "#ffcc80", "#d6e9fb", "#c8e6c9", "#ffcdd2", "#e1bee7", "#fff8e1"


def x(i):
    return X0 + i * (W + GAP)


def box(ax, i, y, label, fill, dashed=False, edge="#555555", width=W):
    ax.add_patch(FancyBboxPatch((x(i), y), width, H, boxstyle="round,pad=0,rounding_size=0.08", facecolor=fill,
                                edgecolor=edge, linestyle=(0, (4, 2)) if dashed else "-", linewidth=1.2))
    ax.text(x(i) + width / 2, y + H / 2, label, ha="center", va="center", fontsize=13)


def arrow(ax, x0, y0, x1, y1):
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="-|>", color="#555555", lw=1.1))


def note(ax, x0, y, text, **kw):
    ax.text(x0, y, text, ha="left", va="center", fontsize=11.5, color="#333333", **kw)


def main(out: Path) -> None:
    fig, ax = plt.subplots(figsize=(12, 6.4))
    ax.set_xlim(0, 17.6)
    ax.set_ylim(-0.5, 8.6)
    ax.axis("off")
    right = x(8) + 0.1
    steps = {7.6: "1  draft", 5.9: "2  verify", 3.6: "3  accept", 1.1: "4  emit,\n    roll back"}
    for y, label in steps.items():
        ax.text(0.1, y + H / 2, label, ha="left", va="center", fontsize=13, fontweight="bold")

    # 1. draft: the context (committed tokens, anchor) and the proposal
    for i, t in enumerate(["$t_1$", "$t_2$", "$t_3$"]):
        box(ax, i, 7.6, t, GREY)
    box(ax, 3, 7.6, "$a$", ANCHOR)
    for k in range(4):
        box(ax, 4 + k, 7.6, f"$x_{k + 1}$", DRAFT, dashed=True)
    note(ax, right, 7.9 + 0.2, "the drafter proposes $x_1, …, x_4$ (γ = 4)")
    note(ax, right, 7.9 - 0.3, "after the anchor $a$ (last committed token)")

    # 2. verify: one target forward over [a, x1..x4] gives p_1..p_5
    ax.add_patch(FancyBboxPatch((x(3), 5.9), x(8) - GAP - x(3), H, boxstyle="round,pad=0,rounding_size=0.08",
                                facecolor=TARGET, edgecolor="#555555", linewidth=1.2))
    ax.text((x(3) + x(8) - GAP) / 2, 5.9 + H / 2, "target: one forward",
            ha="center", va="center", fontsize=12.5)
    for k in range(5):
        cx = x(3 + k) + W / 2
        arrow(ax, cx, 7.58, cx, 6.52)
        arrow(ax, cx, 5.88, cx, 5.25)
        ax.text(cx, 5.0, f"$p_{k + 1}$", ha="center", va="center", fontsize=13)
    note(ax, right, 6.45, "over $[a, x_1, x_2, x_3, x_4]$ gives $p_1, …, p_5$;")
    note(ax, right, 5.95, "$p_k$: the target's distribution of the token")
    note(ax, right, 5.45, "after $a, x_1, …, x_{k-1}$")

    # 3. accept: x1, x2 accepted, x3 rejected -> recovered r; x4 discarded
    box(ax, 4, 3.6, "$x_1$ ✓", OK)
    box(ax, 5, 3.6, "$x_2$ ✓", OK)
    box(ax, 6, 3.6, "$x_3$ ✗", BAD)
    box(ax, 7, 3.6, "$x_4$", "#f7f7f7", dashed=True, edge="#aaaaaa")
    box(ax, 6, 2.5, "$r$", RECOVERED)
    arrow(ax, x(6) + W / 2, 3.58, x(6) + W / 2, 3.12)
    note(ax, right, 4.15, "keep $x_k$ with probability $\\min(1, p_k(x_k)\\,/\\,q_k(x_k))$")
    note(ax, right, 3.6, "at the first rejection, the recovered token")
    note(ax, right, 3.15, "$r \\sim \\mathrm{norm}(\\max(0, p_3 - q_3))$ replaces $x_3$")
    note(ax, right, 2.6, "(all accepted: a bonus token $\\sim p_5$)")

    # 4. emit and roll back
    for i, t in enumerate(["$t_1$", "$t_2$", "$t_3$", "$a$"]):
        box(ax, i, 1.1, t, GREY)
    box(ax, 4, 1.1, "$x_1$", OK)
    box(ax, 5, 1.1, "$x_2$", OK)
    box(ax, 6, 1.1, "$r$", ANCHOR)
    note(ax, x(7) + 0.2, 1.6, "3 tokens from one target forward;")
    note(ax, x(7) + 0.2, 1.1, "$r$ is the next round's anchor")
    note(ax, 0.1, 0.3, "KV cache: keeps $a, x_1, x_2$ and forgets $x_3, x_4$ by moving the request's length back (no copy);")
    note(ax, 0.1, -0.2, "the drafter drops its own state for the rejected drafts in commit().")
    fig.savefig(out, bbox_inches="tight", facecolor="white", metadata={"Date": None} if out.suffix == ".svg" else None)
    plt.close(fig)


if __name__ == "__main__":
    import sys

    here = Path(__file__).resolve().parent
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else here / "round.svg")
