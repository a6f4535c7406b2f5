"""Test helper: the equations of a primitive anywhere in a (nested) jaxpr."""


def find_eqns(closed_jaxpr, primitive_name: str) -> list:
    """All equations binding `primitive_name`, searching sub-jaxprs of every equation."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == primitive_name:
                found.append(eqn)
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        walk(sub.jaxpr)

    walk(closed_jaxpr.jaxpr)
    return found


def in_shapes(eqn) -> list[tuple[int, ...]]:
    return [tuple(v.aval.shape) for v in eqn.invars]


def out_shapes(eqn) -> list[tuple[int, ...]]:
    return [tuple(v.aval.shape) for v in eqn.outvars]
