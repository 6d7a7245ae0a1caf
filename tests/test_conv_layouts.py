"""Depthwise, separable and transposed convolutions against Keras' layers and TF's ops."""
import unittest

import numpy as np
import torch
from torch import nn

from tfcompat_ema import NameMap, Rule, layouts
from _layout_support import (LayoutTestCase, convert_to_torch, load, random_weights,
                             torch_of)


def nchw(x):
    return torch.from_numpy(x).movedim(-1, 1)


def nhwc(y):
    return y.movedim(1, -1)


class DepthwiseTest(LayoutTestCase):
    def check_depthwise2d(self, kernel_leaf, layer, multiplier, rng):
        x = rng.standard_normal((2, 7, 6, 3)).astype(np.float32)      # NHWC, C = 3
        layer(x)
        random_weights(layer, rng)
        expected = layer(x)
        tf_values = {"kernel": torch_of(layer.kernel if kernel_leaf == "kernel"
                                        else layer.depthwise_kernel),
                     "bias": torch_of(layer.bias)}
        self.assertEqual(tuple(tf_values["kernel"].shape), (3, 2, 3, multiplier))
        layout = layouts.depthwise_conv(depth_multiplier=multiplier)
        conv = nn.Conv2d(3, 3 * multiplier, (3, 2), groups=3)
        load(conv, convert_to_torch(layout, tf_values))
        self.assertClose(nhwc(conv(nchw(x))), expected)
        self.assertRoundTrip(layout, tf_values)

    def test_keras_depthwise_conv2d_multiplier_2(self):
        layer = self.keras.layers.DepthwiseConv2D((3, 2), depth_multiplier=2)
        self.check_depthwise2d("kernel", layer, 2, np.random.default_rng(10))

    def test_tf_keras_depthwise_conv2d_multiplier_3(self):
        import tf_keras                        # names its kernel depthwise_kernel
        layer = tf_keras.layers.DepthwiseConv2D((3, 2), depth_multiplier=3)
        layer(np.zeros((1, 7, 6, 3), np.float32))
        self.assertEqual(layer.depthwise_kernel.name.rpartition("/")[2], "depthwise_kernel:0")
        self.check_depthwise2d("depthwise_kernel", layer, 3, np.random.default_rng(11))

    def test_channel_c_multiplier_m_is_output_c_times_m_plus_m(self):
        """TF's own op on one-hot input channels: where each (c, m) lands, element by element."""
        rng = np.random.default_rng(12)
        channels, multiplier = 4, 3
        kernel = rng.standard_normal((1, 1, channels, multiplier)).astype(np.float32)
        x = np.eye(channels, dtype=np.float32).reshape(channels, 1, 1, channels)
        out = self.tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID").numpy()
        (weight,) = layouts.depthwise_conv(depth_multiplier=multiplier)[0].to_torch(
            torch.from_numpy(kernel))
        for c in range(channels):
            for m in range(multiplier):
                self.assertEqual(out[c, 0, 0, c * multiplier + m], kernel[0, 0, c, m])
                self.assertEqual(weight[c * multiplier + m, 0, 0, 0].item(), kernel[0, 0, c, m])

    def test_keras_depthwise_conv1d(self):
        rng = np.random.default_rng(13)
        layer = self.keras.layers.DepthwiseConv1D(3, depth_multiplier=2, use_bias=False)
        x = rng.standard_normal((2, 9, 4)).astype(np.float32)
        layer(x)
        random_weights(layer, rng)
        tf_values = {"kernel": torch_of(layer.kernel)}
        layout = layouts.make("depthwise_conv", depth_multiplier=2)
        conv = nn.Conv1d(4, 8, 3, groups=4, bias=False)
        load(conv, convert_to_torch(layout, tf_values))
        self.assertClose(nhwc(conv(nchw(x))), layer(x))
        self.assertRoundTrip(layout, tf_values)


class SeparableModule(nn.Module):
    """A separable convolution as a PyTorch port writes it: depthwise, then pointwise."""

    def __init__(self, channels, multiplier, filters, kernel_size, conv=nn.Conv2d):
        super().__init__()
        self.depthwise = conv(channels, channels * multiplier, kernel_size, groups=channels,
                              bias=False)
        self.pointwise = conv(channels * multiplier, filters, 1)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


class SeparableTest(LayoutTestCase):
    def test_keras_separable_conv2d(self):
        rng = np.random.default_rng(14)
        layer = self.keras.layers.SeparableConv2D(5, (2, 3), depth_multiplier=2)
        x = rng.standard_normal((2, 6, 7, 3)).astype(np.float32)
        layer(x)
        random_weights(layer, rng)
        expected = layer(x)
        tf_values = {leaf: torch_of(getattr(layer, leaf))
                     for leaf in ("depthwise_kernel", "pointwise_kernel", "bias")}
        self.assertEqual(tuple(tf_values["pointwise_kernel"].shape), (1, 1, 6, 5))
        layout = layouts.separable_conv(depth_multiplier=2)
        module = SeparableModule(3, 2, 5, (2, 3))
        load(module, convert_to_torch(layout, tf_values))
        self.assertClose(nhwc(module(nchw(x))), expected)
        self.assertRoundTrip(layout, tf_values)

    def test_keras_separable_conv1d_through_a_name_map(self):
        """A rule with the layout's options loads a model, as a rules file would."""
        rng = np.random.default_rng(15)
        layer = self.keras.layers.SeparableConv1D(4, 3, depth_multiplier=3)
        x = rng.standard_normal((2, 8, 2)).astype(np.float32)
        layer(x)
        random_weights(layer, rng)
        tf_vars = {f"block/sep/{leaf}": torch_of(getattr(layer, leaf))
                   for leaf in ("depthwise_kernel", "pointwise_kernel", "bias")}
        model = nn.ModuleDict({"sep": SeparableModule(2, 3, 4, 3, conv=nn.Conv1d)})
        names = NameMap([Rule("sep", "block/sep", "separable_conv", depth_multiplier=3)])
        names.load(tf_vars, model, allow_raw=True)
        self.assertClose(nhwc(model["sep"](nchw(x))), layer(x))
        back, _ = names.to_tf(model.state_dict())
        self.assertEqual(set(back), set(tf_vars))
        for name, value in tf_vars.items():
            self.assertTrue(torch.equal(back[name], value), name)

    def test_slim_names_and_torch_module_names(self):
        layout = layouts.make("separable_conv", depthwise_kernel="depthwise_weights",
                              pointwise_kernel="pointwise_weights", bias="biases",
                              torch_depthwise="dw", torch_pointwise="pw.conv")
        self.assertEqual([(p.tf, p.torch) for p in layout],
                         [("depthwise_weights", ("dw.weight",)),
                          ("pointwise_weights", ("pw.conv.weight",)),
                          ("biases", ("pw.conv.bias",))])


class TransposeTest(LayoutTestCase):
    def test_keras_conv2d_transpose_strided_valid_is_not_flipped(self):
        rng = np.random.default_rng(16)
        layer = self.keras.layers.Conv2DTranspose(4, (3, 4), strides=(2, 3), padding="valid")
        x = rng.standard_normal((2, 5, 4, 3)).astype(np.float32)
        layer(x)
        random_weights(layer, rng)
        expected = layer(x)
        tf_values = {"kernel": torch_of(layer.kernel), "bias": torch_of(layer.bias)}
        self.assertEqual(tuple(tf_values["kernel"].shape), (3, 4, 4, 3))     # [H, W, out, in]
        # (kernel >= stride on each axis: Keras' "valid" output then has PyTorch's size)
        conv = nn.ConvTranspose2d(3, 4, (3, 4), stride=(2, 3))
        load(conv, convert_to_torch(layouts.conv_transpose(), tf_values))
        self.assertEqual(tuple(conv.weight.shape), (3, 4, 3, 4))            # [in, out, H, W]
        ours = nhwc(conv(nchw(x)))
        self.assertClose(ours, expected)
        # The same kernel flipped in space gives another output: the test can tell.
        with torch.no_grad():
            conv.weight.copy_(conv.weight.flip(2, 3))
        self.assertGreater(float(np.max(np.abs(nhwc(conv(nchw(x))).detach().numpy()
                                               - np.asarray(expected)))), 0.1)
        self.assertRoundTrip(layouts.conv_transpose(), tf_values)

    def test_keras_valid_output_with_a_kernel_smaller_than_the_stride(self):
        """Keras' "valid" output is in * stride + max(kernel - stride, 0): PyTorch's
        output_padding = stride - kernel gives that size (the extra entries are the bias)."""
        rng = np.random.default_rng(18)
        layer = self.keras.layers.Conv2DTranspose(2, (3, 2), strides=(2, 3), padding="valid")
        x = rng.standard_normal((1, 4, 5, 3)).astype(np.float32)
        layer(x)
        random_weights(layer, rng)
        conv = nn.ConvTranspose2d(3, 2, (3, 2), stride=(2, 3), output_padding=(0, 1))
        tf_values = {"kernel": torch_of(layer.kernel), "bias": torch_of(layer.bias)}
        load(conv, convert_to_torch(layouts.conv_transpose(), tf_values))
        self.assertClose(nhwc(conv(nchw(x))), layer(x))

    def test_keras_conv3d_transpose_strided_valid(self):
        rng = np.random.default_rng(19)
        layer = self.keras.layers.Conv3DTranspose(4, (2, 3, 2), strides=(2, 1, 2),
                                                  padding="valid")
        x = rng.standard_normal((2, 3, 4, 3, 3)).astype(np.float32)         # NDHWC
        layer(x)
        random_weights(layer, rng)
        tf_values = {"kernel": torch_of(layer.kernel), "bias": torch_of(layer.bias)}
        self.assertEqual(tuple(tf_values["kernel"].shape), (2, 3, 2, 4, 3))  # [D,H,W,out,in]
        conv = nn.ConvTranspose3d(3, 4, (2, 3, 2), stride=(2, 1, 2))
        load(conv, convert_to_torch(layouts.conv_transpose(), tf_values))
        self.assertEqual(tuple(conv.weight.shape), (3, 4, 2, 3, 2))         # [in,out,D,H,W]
        self.assertClose(nhwc(conv(nchw(x))), layer(x))
        self.assertRoundTrip(layouts.conv_transpose(), tf_values)

    def test_keras_conv2d_transpose_same_padding(self):
        """TF's "same" output is in * stride: it crops max(kernel - stride, 0) entries of
        the full output, the smaller half before. PyTorch crops padding on both ends, so an
        odd total is PyTorch's padding = the smaller half and one more entry cut at the end
        (the weights are the same whatever the padding: the layout does not change)."""
        rng = np.random.default_rng(20)
        layer = self.keras.layers.Conv2DTranspose(2, (4, 3), strides=(2, 2), padding="same")
        x = rng.standard_normal((2, 5, 4, 3)).astype(np.float32)
        layer(x)
        random_weights(layer, rng)
        expected = layer(x)
        self.assertEqual(tuple(expected.shape), (2, 10, 8, 2))
        conv = nn.ConvTranspose2d(3, 2, (4, 3), stride=(2, 2), padding=(1, 0))  # totals 2, 1
        tf_values = {"kernel": torch_of(layer.kernel), "bias": torch_of(layer.bias)}
        load(conv, convert_to_torch(layouts.conv_transpose(), tf_values))
        ours = conv(nchw(x))[:, :, :, :8]
        self.assertClose(nhwc(ours), expected)

    def test_tf_nn_conv1d_transpose_strided(self):
        rng = np.random.default_rng(17)
        x = rng.standard_normal((2, 6, 3)).astype(np.float32)
        kernel = rng.standard_normal((3, 5, 3)).astype(np.float32)          # [W, out, in]
        expected = self.tf.nn.conv1d_transpose(x, kernel, (2, 13, 5), strides=2,
                                               padding="VALID")
        conv = nn.ConvTranspose1d(3, 5, 3, stride=2, bias=False)
        load(conv, convert_to_torch(layouts.make("conv_transpose", kernel="filters"),
                                    {"filters": torch.from_numpy(kernel)}))
        self.assertClose(nhwc(conv(nchw(x))), expected)


class BadInputTest(unittest.TestCase):
    def test_depth_multiplier_is_checked_both_ways(self):
        kernel, _ = layouts.depthwise_conv()
        with self.assertRaisesRegex(ValueError, r"depthwise kernel shape \(3, 3, 4, 2\) has "
                                                r"depth multiplier 2, the layout 1 \(pass "
                                                r"depth_multiplier=2\)"):
            kernel.to_torch(torch.zeros(3, 3, 4, 2))
        kernel, _ = layouts.depthwise_conv(depth_multiplier=3)
        with self.assertRaisesRegex(ValueError, r"weight shape \(8, 1, 3, 3\) is not a depthwise "
                                                r"weight .* depth_multiplier = 3"):
            kernel.to_tf(torch.zeros(8, 1, 3, 3))
        with self.assertRaisesRegex(ValueError, r"weight shape \(6, 2, 3, 3\) is not a depthwise"):
            kernel.to_tf(torch.zeros(6, 2, 3, 3))            # a grouped conv, not depthwise
        with self.assertRaisesRegex(ValueError, r"depthwise kernel \[spatial..., C, M\], got "
                                                r"shape \(4, 3\)"):
            kernel.to_torch(torch.zeros(4, 3))
        with self.assertRaisesRegex(ValueError, "depth_multiplier must be at least 1, got 0"):
            layouts.make("separable_conv", depth_multiplier=0)
        with self.assertRaisesRegex(ValueError, "option 'depth_multiplier' must be a int"):
            layouts.make("depthwise_conv", depth_multiplier=2.0)

    def test_pointwise_kernel_must_be_1x1(self):
        _, pointwise, bias = layouts.separable_conv()
        with self.assertRaisesRegex(ValueError, r"kernel shape \(3, 3, 4, 5\) is not pointwise"):
            pointwise.to_torch(torch.zeros(3, 3, 4, 5))
        with self.assertRaisesRegex(ValueError, r"pointwise.weight shape \(5, 4, 1, 2\) is not "
                                                "pointwise"):
            pointwise.to_tf(torch.zeros(5, 4, 1, 2))
        with self.assertRaisesRegex(ValueError, r"a bias \[out\], got shape \(1, 5\)"):
            bias.to_torch(torch.zeros(1, 5))

    def test_transpose_ranks(self):
        kernel, _ = layouts.conv_transpose()
        with self.assertRaisesRegex(ValueError, r"\[spatial..., out, in\] kernel, got shape "
                                                r"\(3, 4\)"):
            kernel.to_torch(torch.zeros(3, 4))
        with self.assertRaisesRegex(ValueError, r"weight \[in, out, spatial...\], got shape"):
            kernel.to_tf(torch.zeros(3, 4))

    def test_depthwise_moves_match_a_closed_form(self):
        """kernel[h, w, c, m] == weight[c*M + m, 0, h, w], both ways, without TF."""
        kernel = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
        part, _ = layouts.depthwise_conv(depth_multiplier=5)
        (weight,) = part.to_torch(kernel)
        self.assertEqual(tuple(weight.shape), (20, 1, 2, 3))
        for h, w, c, m in np.ndindex(2, 3, 4, 5):
            self.assertEqual(weight[c * 5 + m, 0, h, w], kernel[h, w, c, m])
        self.assertTrue(torch.equal(part.to_tf(weight), kernel))


if __name__ == "__main__":
    unittest.main()
