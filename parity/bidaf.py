"""A BiDAF-shaped model, trained in TF1 graph style and carried into its PyTorch port.

TF side: char embedding and char-CNN (BiDAF's conv1d), highway layers (``Matrix``/``Bias``),
bidirectional ``BasicLSTMCell`` layers ``prepro/u1/{FW,BW}``, tri-linear attention
``u_logits/first``, modelling LSTMs ``main/g0``..``g2`` and ``logits1``/``logits2``, with the
names the original's TF 0.11 ``_linear`` gave (``BasicLSTMCell/Linear/Matrix``). It trains a
few Adam steps on synthetic data with an EMA over ``tf.trainable_variables()`` at 0.999
and a zero-debiased loss EMA at 0.9, then ``Saver`` saves everything.

PyTorch side: the port with ``nn.LSTM``, ``nn.Linear``, ``nn.Conv2d`` and ``nn.Embedding``,
and ``bidaf_rules.toml`` between the two. :func:`run` checks, through the checkpoint:

* evaluation: the averaged weights loaded into the port give TF's start/end logits (TF
  evaluating with ``Saver(ema.variables_to_restore())``), to float32 tolerance;
* resuming: the averages loaded into our EMAs equal TF's shadows bit for bit, and stay
  equal after one more EMA step on each side;
* the way back: the port and its EMAs written as a TF1 checkpoint restore into TF's graph,
  through ``variables_to_restore()`` (same logits, bit for bit) and a plain ``Saver``.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from torch import nn

from tfcompat_ema import ExponentialMovingAverage, NameMap, read_checkpoint, write_checkpoint

RULES = Path(__file__).with_name("bidaf_rules.toml")
#: Measured max |TF - PyTorch| of the logits is ~1e-6; matmul kernels differ, so not 0.
LOGITS_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Config:
    batch: int = 3
    context: int = 7          # JX, words
    question: int = 4         # JQ, words
    chars: int = 6            # W, characters per word
    char_vocab: int = 20
    word_vocab: int = 30
    char_dim: int = 4
    char_out: int = 5         # char-CNN filters
    width: int = 3            # char-CNN width (its scope is conv1d_3)
    word_dim: int = 6
    hidden: int = 5           # d
    highway_layers: int = 2
    steps: int = 5
    learning_rate: float = 0.01
    var_decay: float = 0.999
    loss_decay: float = 0.9
    seed: int = 0


QUICK = Config(steps=3)


def batch(config: Config, seed: int) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n, jx, jq, w = config.batch, config.context, config.question, config.chars
    return {"cx": rng.integers(0, config.char_vocab, (n, jx, w)).astype(np.int32),
            "cq": rng.integers(0, config.char_vocab, (n, jq, w)).astype(np.int32),
            "x": rng.integers(0, config.word_vocab, (n, jx)).astype(np.int32),
            "q": rng.integers(0, config.word_vocab, (n, jq)).astype(np.int32),
            "y1": rng.integers(0, jx, (n,)).astype(np.int32),
            "y2": rng.integers(0, jx, (n,)).astype(np.int32)}


# ---------------------------------------------------------------------- TensorFlow
class TFModel:
    """The TF1 graph: placeholders, logits, and (``train=True``) the loss, Adam and the EMAs."""

    def __init__(self, tf, config: Config, train: bool):
        v1 = tf.compat.v1
        self.tf, self.config = tf, config
        c = config
        self.inputs = {name: v1.placeholder(tf.int32, shape, name=name) for name, shape in
                       [("cx", [c.batch, c.context, c.chars]), ("cq", [c.batch, c.question, c.chars]),
                        ("x", [c.batch, c.context]), ("q", [c.batch, c.question]),
                        ("y1", [c.batch]), ("y2", [c.batch])]}
        with v1.variable_scope(v1.get_variable_scope(), reuse=v1.AUTO_REUSE):
            self.logits1, self.logits2 = self._logits()
        self.var_ema = v1.train.ExponentialMovingAverage(c.var_decay)
        if not train:
            return
        with tf.name_scope("model_0"):
            losses = [tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=self.inputs[y], logits=logits))
                for y, logits in (("y1", self.logits1), ("y2", self.logits2))]
            self.loss = tf.add(*losses, name="loss")
        self.global_step = v1.train.get_or_create_global_step()
        minimize = v1.train.AdamOptimizer(c.learning_rate).minimize(
            self.loss, global_step=self.global_step)
        self.loss_ema = v1.train.ExponentialMovingAverage(c.loss_decay, zero_debias=True)
        with tf.control_dependencies([minimize]):        # average the weights after the step
            self.train_op = tf.group(self.var_ema.apply(v1.trainable_variables()),
                                     self.loss_ema.apply([self.loss]))
        self.ema_step = self.var_ema.apply(v1.trainable_variables())   # an EMA step alone

    def feed(self, data: Dict[str, np.ndarray]):
        return {self.inputs[k]: v for k, v in data.items()}

    def _linear(self, args: List, size: int, scope: str):
        """BiDAF's ``linear()``: TF 0.11's ``_linear``, one ``Matrix`` over the args, ``Bias``."""
        tf, v1 = self.tf, self.tf.compat.v1
        flat = tf.concat(args, -1)
        with v1.variable_scope(scope):
            matrix = v1.get_variable("Matrix", [flat.shape[-1], size])
            bias = v1.get_variable("Bias", [size], initializer=v1.zeros_initializer())
        return tf.tensordot(flat, matrix, 1) + bias

    def _lstm(self, inputs, scope: str, reverse: bool):
        """TF 0.11's ``BasicLSTMCell`` (gates i, j, f, o; forget_bias 1.0), unrolled."""
        tf, v1 = self.tf, self.tf.compat.v1
        steps = tf.unstack(inputs, axis=1)
        steps = steps[::-1] if reverse else steps
        c = h = tf.zeros([self.config.batch, self.config.hidden])
        outputs = []
        with v1.variable_scope(scope), v1.variable_scope("BasicLSTMCell"):
            for x in steps:
                i, j, f, o = tf.split(self._linear([x, h], 4 * self.config.hidden, "Linear"), 4, 1)
                c = c * tf.sigmoid(f + 1.0) + tf.sigmoid(i) * tf.tanh(j)
                h = tf.tanh(c) * tf.sigmoid(o)
                outputs.append(h)
        return tf.stack(outputs[::-1] if reverse else outputs, axis=1)

    def _bilstm(self, inputs, scope: str):
        with self.tf.compat.v1.variable_scope(scope):
            return self.tf.concat([self._lstm(inputs, "FW", False),
                                   self._lstm(inputs, "BW", True)], -1)

    def _logits(self):
        tf, v1, c = self.tf, self.tf.compat.v1, self.config
        scope = v1.variable_scope
        with scope("emb"):
            with scope("emb_var"):
                char_mat = v1.get_variable("char_emb_mat", [c.char_vocab, c.char_dim])
                word_mat = v1.get_variable("word_emb_mat", [c.word_vocab, c.word_dim])

            def words(chars, ids):
                with scope("char"), scope("conv"), scope("xx"), scope(f"conv1d_{c.width}"):
                    kernel = v1.get_variable("filter", [1, c.width, c.char_dim, c.char_out])
                    bias = v1.get_variable("bias", [c.char_out], initializer=v1.zeros_initializer())
                conv = tf.nn.conv2d(tf.nn.embedding_lookup(char_mat, chars), kernel,
                                    [1, 1, 1, 1], "VALID") + bias
                return tf.concat([tf.reduce_max(tf.nn.relu(conv), 2),
                                  tf.nn.embedding_lookup(word_mat, ids)], -1)
            xx, qq = words(self.inputs["cx"], self.inputs["x"]), words(self.inputs["cq"], self.inputs["q"])

        def highway(arg):
            with scope("highway"):
                for layer in range(c.highway_layers):
                    with scope(f"layer_{layer}"):
                        trans = tf.nn.relu(self._linear([arg], arg.shape[-1], "trans"))
                        gate = tf.sigmoid(self._linear([arg], arg.shape[-1], "gate"))
                        arg = gate * trans + (1 - gate) * arg
            return arg
        xx, qq = highway(xx), highway(qq)
        with scope("prepro"):
            u, h = self._bilstm(qq, "u1"), self._bilstm(xx, "u1")
        with scope("main"):
            with scope("p0"), scope("bi_attention"):
                h_aug = tf.tile(h[:, :, None], [1, 1, c.question, 1])
                u_aug = tf.tile(u[:, None], [1, c.context, 1, 1])
                with scope("u_logits"):
                    logits = tf.squeeze(self._linear([h_aug, u_aug, h_aug * u_aug], 1, "first"), -1)
                u_a = tf.reduce_sum(tf.nn.softmax(logits)[..., None] * u_aug, 2)
                h_a = tf.reduce_sum(tf.nn.softmax(tf.reduce_max(logits, 2))[..., None] * h, 1)
                p0 = tf.concat([h, u_a, h * u_a, h * tf.tile(h_a[:, None], [1, c.context, 1])], -1)
            g1 = self._bilstm(self._bilstm(p0, "g0"), "g1")
            with scope("logits1"):
                logits1 = tf.squeeze(self._linear([g1, p0], 1, "first"), -1)
            a1i = tf.reduce_sum(tf.nn.softmax(logits1)[..., None] * g1, 1)
            a1i = tf.tile(a1i[:, None], [1, c.context, 1])
            g2 = self._bilstm(tf.concat([p0, g1, a1i, g1 * a1i], -1), "g2")
            with scope("logits2"):
                logits2 = tf.squeeze(self._linear([g2, p0], 1, "first"), -1)
        return logits1, logits2


def _import_tf():
    import tensorflow as tf
    return tf


def tf_train(config: Config, prefix: str) -> Dict[str, np.ndarray]:
    """Train, save with ``Saver``; then one more EMA step: the shadows after it, by TF name."""
    tf = _import_tf()
    with tf.Graph().as_default():
        tf.compat.v1.set_random_seed(config.seed)
        model = TFModel(tf, config, train=True)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            for step in range(config.steps):
                sess.run(model.train_op, model.feed(batch(config, config.seed + 1 + step)))
            tf.compat.v1.train.Saver().save(sess, prefix)
            sess.run(model.ema_step)
            return {model.var_ema.average_name(v): sess.run(model.var_ema.average(v))
                    for v in tf.compat.v1.trainable_variables()}


def tf_evaluate(config: Config, prefix: str, averaged: bool = True):
    """TF's start/end logits on the evaluation batch, restored as TF evaluation scripts do."""
    tf = _import_tf()
    with tf.Graph().as_default():
        model = TFModel(tf, config, train=False)
        restore = model.var_ema.variables_to_restore() if averaged else None
        with tf.compat.v1.Session() as sess:
            tf.compat.v1.train.Saver(restore).restore(sess, prefix)
            return sess.run([model.logits1, model.logits2], model.feed(eval_batch(config)))


def tf_restore(config: Config, prefix: str, names: List[str]) -> Dict[str, np.ndarray]:
    """Restore ``names`` of the training graph (weights, shadows, debias state) with Saver."""
    tf = _import_tf()
    with tf.Graph().as_default():
        TFModel(tf, config, train=True)
        variables = {v.op.name: v for v in tf.compat.v1.global_variables()}
        with tf.compat.v1.Session() as sess:
            tf.compat.v1.train.Saver({n: variables[n] for n in names}).restore(sess, prefix)
            return sess.run({n: variables[n] for n in names})


def eval_batch(config: Config) -> Dict[str, np.ndarray]:
    return batch(config, config.seed + 10_000)


# ---------------------------------------------------------------------- PyTorch
class Highway(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.trans = nn.Linear(dim, dim)
        self.gate = nn.Linear(dim, dim)

    def forward(self, x):
        gate = torch.sigmoid(self.gate(x))
        return gate * torch.relu(self.trans(x)) + (1 - gate) * x


class BiDAF(nn.Module):
    """The PyTorch port. ``bias_hh`` holds TF's constant ``forget_bias``, so it is frozen."""

    def __init__(self, config: Config):
        super().__init__()
        c, d = config, config.hidden
        self.char_emb = nn.Embedding(c.char_vocab, c.char_dim)
        self.word_emb = nn.Embedding(c.word_vocab, c.word_dim)
        self.char_cnn = nn.Conv2d(c.char_dim, c.char_out, (1, c.width))
        dim = c.char_out + c.word_dim
        self.highway = nn.ModuleList(Highway(dim) for _ in range(c.highway_layers))

        def bilstm(inputs):
            return nn.LSTM(inputs, d, batch_first=True, bidirectional=True)
        self.prepro = bilstm(dim)
        self.attention = nn.Linear(6 * d, 1)
        self.g0, self.g1, self.g2 = bilstm(8 * d), bilstm(2 * d), bilstm(14 * d)
        self.logits1 = nn.Linear(10 * d, 1)
        self.logits2 = nn.Linear(10 * d, 1)
        for name, parameter in self.named_parameters():
            if ".bias_hh" in f".{name}":
                parameter.requires_grad_(False)

    def words(self, chars, ids):
        conv = self.char_cnn(self.char_emb(chars).permute(0, 3, 1, 2))     # [N, out, J, W']
        x = torch.cat([torch.relu(conv).amax(-1).permute(0, 2, 1), self.word_emb(ids)], -1)
        for layer in self.highway:
            x = layer(x)
        return x

    def forward(self, cx, cq, x, q):
        h, _ = self.prepro(self.words(cx, x))
        u, _ = self.prepro(self.words(cq, q))
        jx, jq = h.shape[1], u.shape[1]
        h_aug = h[:, :, None].expand(-1, -1, jq, -1)
        u_aug = u[:, None].expand(-1, jx, -1, -1)
        logits = self.attention(torch.cat([h_aug, u_aug, h_aug * u_aug], -1)).squeeze(-1)
        u_a = (torch.softmax(logits, -1)[..., None] * u_aug).sum(2)
        h_a = (torch.softmax(logits.amax(2), -1)[..., None] * h).sum(1)
        p0 = torch.cat([h, u_a, h * u_a, h * h_a[:, None].expand(-1, jx, -1)], -1)
        g1, _ = self.g1(self.g0(p0)[0])
        logits1 = self.logits1(torch.cat([g1, p0], -1)).squeeze(-1)
        a1i = (torch.softmax(logits1, -1)[..., None] * g1).sum(1)[:, None].expand(-1, jx, -1)
        g2, _ = self.g2(torch.cat([p0, g1, a1i, g1 * a1i], -1))
        return logits1, self.logits2(torch.cat([g2, p0], -1)).squeeze(-1)


def torch_logits(model: BiDAF, config: Config):
    data = {k: torch.from_numpy(v.astype(np.int64)) for k, v in eval_batch(config).items()}
    with torch.no_grad():
        return [t.numpy() for t in model(data["cx"], data["cq"], data["x"], data["q"])]


# ---------------------------------------------------------------------- both
@dataclass
class Outcome:
    config: Config
    max_logit_diff: float = float("nan")      # averaged weights: |TF - port|
    raw_logit_gap: float = float("nan")       # |TF averaged - TF raw|: what loading raw would miss
    shadows: int = 0                          # TF averages compared (variables + loss)
    shadows_exact: int = 0
    resumed: int = 0                          # weight averages after one more EMA step
    resumed_exact: int = 0
    restored_logits_exact: bool = False       # exported checkpoint -> TF variables_to_restore
    restored_exact: int = 0                   # exported checkpoint -> TF Saver, every entry
    restored: int = 0
    report: str = ""
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def run(config: Config = Config()) -> Outcome:
    """Train in TF, load into the port and our EMAs, go back to TF; every check's outcome."""
    out = Outcome(config)
    names = NameMap.from_file(RULES)
    with tempfile.TemporaryDirectory() as directory:
        prefix = str(Path(directory) / "tf" / "model.ckpt")
        shadows_after_step = tf_train(config, prefix)
        expected = tf_evaluate(config, prefix)
        raw = tf_evaluate(config, prefix, averaged=False)
        ckpt = read_checkpoint(prefix)

        # Evaluation: the averaged weights into the port.
        model = BiDAF(config)
        out.report = str(names.load(ckpt.tensors, model))
        ours = torch_logits(model, config)
        out.max_logit_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ours, expected))
        out.raw_logit_gap = max(float(np.max(np.abs(a - b))) for a, b in zip(raw, expected))
        if not out.max_logit_diff <= LOGITS_TOLERANCE:
            out.problems.append(f"logits differ from TF's by {out.max_logit_diff:.3g}")
        if not out.raw_logit_gap > 10 * LOGITS_TOLERANCE:
            out.problems.append("the averaged and raw weights give the same logits: "
                                "the check could not tell them apart")

        # Resuming: raw weights into the port, averages into our EMAs.
        model = BiDAF(config)
        var_ema = ExponentialMovingAverage(config.var_decay)
        loss_ema = ExponentialMovingAverage(config.loss_decay, zero_debias=True)
        names.load(ckpt.tensors, model, ema=var_ema, tensor_ema=loss_ema)
        exported = names.export(model, ema=var_ema, tensor_ema=loss_ema)
        suffix = "/" + names.ema_name
        averages = [k for k in ckpt.tensors if k.endswith(suffix) or suffix + "/" in k]
        out.shadows = len(averages)
        out.shadows_exact = sum(_same_bits(exported.get(k, np.nan), ckpt.tensors[k])
                                for k in averages)
        if out.shadows_exact != out.shadows:
            out.problems.append(f"{out.shadows - out.shadows_exact} of {out.shadows} shadows "
                                "loaded are not TF's bit for bit")

        # The way back, before our EMA moves: TF restores what we write.
        back = str(Path(directory) / "back" / "model.ckpt")
        write_checkpoint(back, exported)
        restored = tf_evaluate(config, back)
        out.restored_logits_exact = all(_same_bits(a, b) for a, b in zip(restored, expected))
        if not out.restored_logits_exact:
            out.problems.append("TF's logits from our checkpoint differ from its own")
        values = tf_restore(config, back, sorted(exported))
        out.restored = len(values)
        out.restored_exact = sum(_same_bits(values[k], ckpt.tensors[k]) for k in values)
        if out.restored_exact != out.restored:
            out.problems.append(f"{out.restored - out.restored_exact} of {out.restored} "
                                "entries TF restored from our checkpoint differ from TF's own")

        # One more EMA step on each side, from the loaded state.
        var_ema.apply(model)
        stepped = names.export(model, ema=var_ema)
        out.resumed = len(shadows_after_step)
        out.resumed_exact = sum(_same_bits(stepped.get(k, np.nan), v)
                                for k, v in shadows_after_step.items())
        if out.resumed_exact != out.resumed:
            out.problems.append(f"after one more EMA step, {out.resumed - out.resumed_exact} "
                                f"of {out.resumed} shadows differ from TF's")
    return out


def describe(out: Outcome) -> List[str]:
    c = out.config
    return [
        f"BiDAF-style port ({c.steps} Adam steps, EMA {c.var_decay} over the weights, "
        f"zero-debiased loss EMA {c.loss_decay}):",
        f"  evaluation: averaged weights -> port, max |logits TF - PyTorch| = "
        f"{out.max_logit_diff:.3g} (tolerance {LOGITS_TOLERANCE:g}; raw weights would be off "
        f"by {out.raw_logit_gap:.3g})",
        f"  resume: {out.shadows_exact}/{out.shadows} averages loaded into our EMAs are TF's bit "
        f"for bit; {out.resumed_exact}/{out.resumed} after one more EMA step",
        f"  back to TF: variables_to_restore logits bit-exact: "
        f"{'yes' if out.restored_logits_exact else 'NO'}; Saver restored "
        f"{out.restored_exact}/{out.restored} entries bit-exact",
    ] + [f"  PROBLEM: {p}" for p in out.problems]


if __name__ == "__main__":
    import sys
    result = run(replace(Config(), steps=int(sys.argv[1])) if len(sys.argv) > 1 else Config())
    print("\n".join(describe(result)))
