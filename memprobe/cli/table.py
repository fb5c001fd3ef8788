"""The plain aligned text table every command prints its summaries with."""

from __future__ import annotations

from collections.abc import Sequence


def table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A plain aligned text table (numbers to 3 decimals, None as '-')."""

    def cell(v) -> str:  # noqa: ANN001
        if v is None:
            return "-"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in columns]

    def line(vals: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(vals, widths, numeric, strict=True))

    return "\n".join([line(list(columns)), line(["-" * w for w in widths]), *map(line, cells)])
