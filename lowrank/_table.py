"""One plain-text table renderer, shared by `Plan`, `Summary` and `ModelIndex`."""


def render_table(
    header: list[str], rows: list[list[str]], footer: list[list[str]] = ()
) -> list[str]:
    """Left-aligned columns two spaces apart, a rule under the header and above the footer.

    Args:
        header: the column titles.
        rows: the body, one list of cells (strings) per row, as long as `header`.
        footer: total rows, set off from the body by a rule (none: no rule).

    Returns:
        The table's lines, trailing spaces stripped.
    """
    every = [header, *rows, *footer]
    widths = [max(len(r[i]) for r in every) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [line(header), rule, *map(line, rows)]
    if footer:
        lines += [rule, *map(line, footer)]
    return lines


def human(x: int) -> str:
    """A count in three significant digits with a k/M/G suffix: 1234567 -> '1.23M'."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return str(x)


def shape_str(shape: tuple[int, ...], stack_dims: int) -> str:
    """`128x32`, or `[4]128x32` for a stack of 4 such layers."""
    stack = "".join(f"[{d}]" for d in shape[:stack_dims])
    return stack + "x".join(map(str, shape[stack_dims:]))


def listing(paths: list[str], limit: int = 6) -> str:
    """The first `limit` paths, comma-separated, with how many more there are."""
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more
