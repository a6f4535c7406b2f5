"""Students of a byte-level teacher: its size and checks, the teacher factorized by
`lowrank` under a parameter budget (`factorized_student`), or a narrower dense
`Transformer` of matching size (`dense_student`)."""

import dataclasses
import math
import re

import equinox as eqx
import jax
import jax.random as jr
from jaxtyping import Array, Int, PRNGKeyArray

import lowrank

from .models import BYTE_VOCAB, Transformer

FACTORIZE_TARGET = r"blocks\.\d+\.(attn\.(query|key|value|output)_proj|mlp\.fc[12])"
"""The layers a factorized student factorizes: attention projections and MLPs."""
_MLP_IN = re.compile(r"blocks\.\d+\.mlp\.fc1")


def _count(tree) -> int:
    """Parameters of a pytree of arrays or of `jax.ShapeDtypeStruct`s."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))


def non_embedding_params(model: Transformer) -> int:
    """Parameters outside the token and position embeddings (blocks, final norm, head).

    Args:
        model: a (dense or factorized) byte-level `Transformer`.

    Returns:
        The parameter count.
    """
    return _count((model.blocks, model.ln_f, model.head))


def transformer_kwargs(model: Transformer) -> dict:
    """Constructor arguments that rebuild `model`'s dense skeleton (factorized or not).

    Args:
        model: a (dense or factorized) `Transformer`.

    Returns:
        `Transformer(**kwargs, key=...)`'s keyword arguments.
    """
    return dict(
        vocab_size=model.vocab_size,
        context=model.context,
        d_model=model.d_model,
        n_layers=model.n_layers,
        n_heads=model.n_heads,
        mlp_ratio=model.blocks[0].mlp.fc1.out_features // model.d_model,
        dropout=float(model.dropout.p),
        tie_embeddings=model.tie_embeddings,
        rotary=model.rotary,
    )


def check_context(model: Transformer, length: int, *, name: str = "length") -> None:
    """Raise unless windows of `length` tokens fit the model's context.

    Args:
        model: the model the windows feed.
        length: the window length in tokens.
        name: the argument named in the error.
    """
    if length > model.context:
        raise ValueError(
            f"{name}={length} is longer than the model context {model.context}; "
            f"use {name} <= {model.context} or a model with a larger context"
        )


def check_vocab(teacher: Transformer, student: Transformer) -> None:
    """Raise unless teacher and student predict over the same tokens (KD compares them
    token by token) and that vocabulary covers the byte tokenizer.

    Args:
        teacher: the teacher model.
        student: the student model.
    """
    if teacher.vocab_size != student.vocab_size:
        raise ValueError(
            f"teacher vocab_size={teacher.vocab_size} differs from student "
            f"vocab_size={student.vocab_size}; distillation needs one tokenizer: build the "
            f"student with vocab_size={teacher.vocab_size}"
        )
    if teacher.vocab_size < BYTE_VOCAB:
        raise ValueError(
            f"vocab_size={teacher.vocab_size} cannot hold the byte tokenizer's "
            f"{BYTE_VOCAB} ids; build the models with vocab_size={BYTE_VOCAB}"
        )


def _keep_only(plan: lowrank.Plan, paths: set[str]) -> lowrank.Plan:
    for lp in plan.factorized:
        if lp.path not in paths:
            plan = plan.with_rank(lp.path, None)
    return plan


def factorized_student(
    teacher: Transformer,
    *,
    params: float,
    init: str = "spectral",
    calibration: Int[Array, "n T"] | None = None,
    key: PRNGKeyArray,
) -> tuple[Transformer, lowrank.Plan]:
    """The teacher with its attention projections and MLPs factorized under
    `lowrank.Budget(params=params)` of those layers, and the plan (for `save_lm`).

    `init`: "spectral", "random", "whitened" (needs `calibration`, a batch of token
    windows), or "nkp": each MLP's first layer by NKP for its GELU (on `calibration`
    when given), then the other (linear) layers whitened on the model so far, or
    spectral without data.

    Args:
        teacher: the dense teacher (left unchanged).
        params: the budget, a fraction of those layers' parameters.
        init: the factor initializer (see above).
        calibration: (n, T) token windows for the data-aware inits.
        key: the initializer key (keyword-only).

    Returns:
        (student, plan).
    """
    if init not in ("spectral", "random", "whitened", "nkp"):
        raise ValueError(
            f"init={init!r} is not a student init; use 'spectral', 'whitened', 'nkp' or 'random'"
        )
    try:
        plan = lowrank.plan(teacher, rank=lowrank.Budget(params=params), target=FACTORIZE_TARGET)
    except ValueError as e:
        raise ValueError(f"student params={params}: {e}") from e
    if init in ("spectral", "random"):
        return lowrank.factorize(teacher, plan=plan, init=init, key=key, return_plan=True)
    if init == "whitened":
        return lowrank.factorize(
            teacher, plan=plan, init="whitened", calibration=calibration, key=key, return_plan=True
        )
    mlp_in = {lp.path for lp in plan.factorized if _MLP_IN.fullmatch(lp.path)}
    rest = {lp.path for lp in plan.factorized} - mlp_in
    k1, k2 = jr.split(key)
    model, first = lowrank.factorize(
        teacher,
        plan=_keep_only(plan, mlp_in),
        init=lowrank.NKP(activation=jax.nn.gelu),
        calibration=calibration,
        key=k1,
        return_plan=True,
    )
    model, second = lowrank.factorize(
        model,
        plan=_keep_only(plan, rest),
        init="spectral" if calibration is None else "whitened",
        calibration=calibration,
        key=k2,
        return_plan=True,
    )
    layers = [first[lp.path] if lp.path in mlp_in else second[lp.path] for lp in plan.layers]
    return model, dataclasses.replace(plan, layers=layers)


def dense_student(teacher: Transformer, *, params: float, key: PRNGKeyArray) -> Transformer:
    """A dense Transformer of the teacher's depth, heads, context and vocabulary whose
    width gives the non-embedding parameter count closest to `params` x the teacher's.

    Args:
        teacher: the teacher whose shape the student copies.
        params: the target fraction of its non-embedding parameters, in (0, 1].
        key: the initialization key (keyword-only).

    Returns:
        The untrained dense student.
    """
    if not 0 < params <= 1:
        raise ValueError(f"student params={params} must be a fraction in (0, 1]")
    kwargs = transformer_kwargs(teacher)
    target = params * non_embedding_params(teacher)
    step = kwargs["n_heads"] * (2 if teacher.rotary else 1)

    def count(width: int) -> int:
        shapes = eqx.filter_eval_shape(Transformer, **{**kwargs, "d_model": width}, key=key)
        return non_embedding_params(shapes)

    counts = {w: count(w) for w in range(step, teacher.d_model + 1, step)}
    if counts[step] > target:
        raise ValueError(
            f"student params={params} cannot be met by a dense student: the narrowest one "
            f"(d_model={step}) already has {counts[step] / (target / params):.3f} of the "
            f"teacher's non-embedding parameters; raise params"
        )
    width = min(counts, key=lambda w: abs(counts[w] - target))
    return Transformer(**{**kwargs, "d_model": width}, key=key)
