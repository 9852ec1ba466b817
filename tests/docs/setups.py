"""What the documentation's blocks take as the reader's own: models, batches, optimizers, losses.

Each function returns the names a block uses without defining them (``setup=`` in its directive,
see :mod:`tests.docs.blocks`), small enough that a block runs in milliseconds to a second. None
returns a module: a block must import what it uses. The ``then`` functions take the namespace a
block left and exercise what it defined. Stand-ins follow the calling conventions the docs assume
(a Hugging Face model is called as ``model(**tokens)`` and returns ``.last_hidden_state``).
"""

from __future__ import annotations

import types
from typing import Any

ROWS, DIM, OUT = 128, 16, 8


# -- torch ----------------------------------------------------------------------------------------

def torch_pair() -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    encoder = torch.nn.Linear(DIM, OUT)
    return {"encoder": encoder, "queries": torch.randn(ROWS, DIM),
            "passages": torch.randn(ROWS, DIM),
            "optimizer": torch.optim.SGD(encoder.parameters(), lr=0.1)}


def torch_info_nce() -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    def info_nce(q, p, temperature=0.05):
        return F.cross_entropy(q @ p.T / temperature, torch.arange(len(q)))

    return {"info_nce": info_nce}


def torch_loop() -> dict[str, Any]:
    import torch

    return {"scaler": torch.amp.GradScaler("cpu"), "accumulation_steps": 2, "step": 1}


def _hf_like(vocab: int = 100, width: int = OUT, pooled: bool = False, device: str = "cpu"):
    """A module with a Hugging Face encoder's convention: ``model(input_ids=..., attention_mask=...)``
    returns ``.last_hidden_state`` (or, ``pooled``, the mean over the mask as a tensor)."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, width)
            self.mix = torch.nn.Linear(width, width)

        def forward(self, input_ids, attention_mask, **_):
            hidden = torch.tanh(self.mix(self.embed(input_ids))) * attention_mask[..., None]
            if pooled:
                return hidden.sum(1) / attention_mask.sum(1, keepdim=True)
            return types.SimpleNamespace(last_hidden_state=hidden)

    torch.manual_seed(0)
    return Encoder().to(device)


def _tokenizer(vocab: int = 100):
    """``tokenizer(texts, padding=True, return_tensors="pt")``: one id per word, padded."""
    import torch

    def tokenize(texts, padding=True, return_tensors="pt"):
        ids = [[1 + hash(word) % (vocab - 1) for word in text.split()] for text in texts]
        width = max(map(len, ids))
        return {"input_ids": torch.tensor([row + [0] * (width - len(row)) for row in ids]),
                "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row))
                                                for row in ids])}

    return tokenize


def _texts(count: int, seed: int) -> list[str]:
    import random

    words = "gradient cache chunk batch loss query passage encoder memory exact".split()
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=rng.randint(2, 9))) for _ in range(count)]


def hf_model() -> dict[str, Any]:
    """A tokenizer, a model, 40 queries and 2 passages per query (positive first), as text."""
    return {"tokenizer": _tokenizer(), "model": _hf_like(), "queries": _texts(40, 0),
            "passages": _texts(80, 1)}


def hf_batch() -> dict[str, Any]:
    """A model, tokenized queries and passages, a pooling function and a loss (trainers.md)."""
    import torch
    import torch.nn.functional as F

    tokenize = _tokenizer()

    def info_nce(q, p, temperature=0.05):
        return F.cross_entropy(q @ p.T / temperature, torch.arange(len(q)))

    return {"model": _hf_like(), "queries": tokenize(_texts(40, 0)),
            "passages": tokenize(_texts(40, 1)), "info_nce": info_nce,
            "pool": lambda out: out.last_hidden_state[:, 0]}


def towers() -> dict[str, Any]:
    return {"query_tower": _hf_like(pooled=True), "passage_tower": _hf_like(pooled=True)}


def cuda_encoder() -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    tokenize = _tokenizer()
    model = _hf_like(pooled=True, device="cuda")

    def info_nce(q, p, temperature=0.05):
        return F.cross_entropy(q.float() @ p.float().T / temperature,
                               torch.arange(len(q), device=q.device))

    def on_gpu(tokens):
        return {name: value.cuda() for name, value in tokens.items()}

    return {"model": model, "q": on_gpu(tokenize(_texts(40, 0))),
            "p": on_gpu(tokenize(_texts(40, 1))), "info_nce": info_nce,
            "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}


def original_api() -> dict[str, Any]:
    """What the original GradCache's users have: a model with ``.pooler_output``, its loss."""
    import torch
    import torch.nn.functional as F

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(DIM, OUT)

        def forward(self, x):
            return types.SimpleNamespace(pooler_output=self.linear(x))

    def loss_fn(q, p, reduction="mean"):
        return F.cross_entropy(q.float() @ p.float().T, torch.arange(len(q)), reduction=reduction)

    torch.manual_seed(0)
    return {"model": Model(), "loss_fn": loss_fn, "scaler": torch.amp.GradScaler("cpu"),
            "queries": torch.randn(64, DIM), "passages": torch.randn(64, DIM)}


# -- JAX ------------------------------------------------------------------------------------------

def jax_problem() -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import optax

    def apply_fn(params, x, rng):             # with dropout: the step hands each chunk its key
        keep = jax.random.bernoulli(rng, 0.9, x.shape)
        return jnp.tanh(jnp.where(keep, x / 0.9, 0.0) @ params["w"])

    def info_nce(q, d, temperature=0.05):
        scores = q @ d.T / temperature
        return jnp.mean(jax.nn.logsumexp(scores, axis=1) - jnp.diagonal(scores))

    def l2(params):
        return 1e-4 * sum(jnp.sum(leaf ** 2) for leaf in jax.tree_util.tree_leaves(params))

    params = {"w": 0.1 * jax.random.normal(jax.random.PRNGKey(0), (DIM, OUT))}
    tx = optax.sgd(0.1)
    return {"apply_fn": apply_fn, "info_nce": info_nce, "l2": l2, "params": params, "tx": tx,
            "opt_state": tx.init(params), "key": jax.random.PRNGKey(1),
            # 128 rows: two chunks of the docs' chunk_size=64, one compiled loop body
            "q": jax.random.normal(jax.random.PRNGKey(2), (128, DIM)),
            "d": jax.random.normal(jax.random.PRNGKey(3), (128, DIM))}


def call_jax_train_step(namespace: dict) -> None:
    import jax.numpy as jnp

    params, opt_state, loss = namespace["train_step"](
        namespace["params"], namespace["opt_state"], namespace["q"], namespace["d"],
        namespace["key"])
    assert bool(jnp.isfinite(loss)) and params["w"].shape == namespace["params"]["w"].shape


def jax_across_ranks() -> dict[str, Any]:
    """This device's share of a batch over every device: 8 queries and 4 passages each per device,
    an encoder, its parameters, and the by-hand example's representations and log-temperature."""
    import jax
    import jax.numpy as jnp

    devices = len(jax.devices())
    keys = jax.random.split(jax.random.PRNGKey(0), 5)

    def encode(params, x):
        return jnp.tanh(x @ params["w"])

    return {"encode": encode, "params": {"w": 0.1 * jax.random.normal(keys[0], (DIM, OUT))},
            "queries": jax.random.normal(keys[1], (8 * devices, DIM)),
            "passages": jax.random.normal(keys[2], (32 * devices, DIM)),
            "x": jax.random.normal(keys[3], (8 * devices, OUT)),
            "y": jax.random.normal(keys[4], (32 * devices, OUT)),
            "log_t": jnp.log(jnp.asarray(0.05))}


# -- TensorFlow -----------------------------------------------------------------------------------

def tf_pair() -> dict[str, Any]:
    import tensorflow as tf

    tf.random.set_seed(0)   # the step's inputs only; the test suite sets no global seed otherwise
    encoder = tf.keras.Sequential([tf.keras.Input((DIM,)), tf.keras.layers.Dense(OUT)])

    def info_nce(q, p, temperature=0.05):
        scores = tf.matmul(q, p, transpose_b=True) / temperature
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            tf.range(tf.shape(q)[0]), scores))

    return {"encoder": encoder, "info_nce": info_nce,
            "queries": tf.random.normal((ROWS, DIM)), "passages": tf.random.normal((ROWS, DIM)),
            "optimizer": tf.keras.optimizers.SGD(0.1)}


def tf_across_ranks_train(namespace: dict) -> None:
    """Runs the block's ``train`` on every replica of its strategy: 4 queries per replica with
    their positive and 3 hard negatives each; the loss comes back finite and alike everywhere."""
    import numpy as np

    strategy = namespace["strategy"]
    rng = np.random.default_rng(0)
    replicas = strategy.num_replicas_in_sync
    queries = rng.normal(size=(4 * replicas, 32)).astype("float32")
    passages = rng.normal(size=(16 * replicas, 32)).astype("float32")

    def split(array, rows):
        return strategy.experimental_distribute_values_from_function(
            lambda context: array[context.replica_id_in_sync_group * rows:
                                  (context.replica_id_in_sync_group + 1) * rows])

    losses = [float(value) for value in strategy.experimental_local_results(
        namespace["train"](split(queries, 4), split(passages, 16)))]
    assert len(losses) == replicas and np.isfinite(losses).all() and np.ptp(losses) < 1e-5


def mlx_problem() -> dict[str, Any]:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    def info_nce(q, p):
        scores = q @ p.T
        return mx.mean(mx.logsumexp(scores, axis=1) - mx.diagonal(scores))

    mx.random.seed(0)
    # 128 rows: two chunks of the docs' chunk_size=64
    return {"model": nn.Linear(DIM, OUT), "info_nce": info_nce, "optimizer": optim.SGD(0.1),
            "queries": mx.random.normal((128, DIM)), "passages": mx.random.normal((128, DIM))}
