"""EMAModule: averaged weights in eval mode, live weights in train mode, buffer policies."""
import io
import unittest

import torch
from torch import nn

from tfcompat_ema import EMAModule


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))


def train_step(model, x):
    model.train()
    loss = model(x).pow(2).mean()
    loss.backward()
    with torch.no_grad():
        for p in model.module.parameters():
            p.sub_(0.1 * p.grad)
            p.grad = None
    model.update()


class EMAModuleTest(unittest.TestCase):
    def setUp(self):
        self.x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))

    def test_eval_uses_averages_and_train_uses_live_weights(self):
        model = EMAModule(make_model(), decay=0.9)
        for _ in range(3):
            train_step(model, self.x)
        model.eval()
        averaged = model(self.x)
        with model.ema.average_parameters(model.module):   # the same thing, by swapping
            reference = model.module(self.x)
        self.assertTrue(torch.equal(averaged, reference))
        self.assertFalse(torch.equal(averaged, model.module(self.x)))
        model.train()
        self.assertTrue(torch.equal(model(self.x), model.module(self.x)))

    def test_before_the_first_update_eval_runs_live_weights(self):
        model = EMAModule(make_model(), decay=0.9).eval()
        self.assertTrue(torch.equal(model(self.x), model.module(self.x)))

    def test_buffers_copied_by_default_or_averaged(self):
        copied = EMAModule(make_model(), decay=0.5)
        averaged = EMAModule(make_model(), decay=0.5, buffers="average")
        for model in (copied, averaged):
            for _ in range(2):
                train_step(model, self.x)
        self.assertIsNone(copied.ema.average(copied.module[1].running_mean))
        shadow = averaged.ema.average(averaged.module[1].running_mean)
        self.assertIsNotNone(shadow)
        self.assertFalse(torch.equal(shadow, averaged.module[1].running_mean))
        self.assertIsNone(averaged.ema.average(averaged.module[1].num_batches_tracked))
        with self.assertRaisesRegex(ValueError, "buffers"):
            EMAModule(make_model(), decay=0.5, buffers="ignore")

    def test_state_dict_carries_the_averages(self):
        model = EMAModule(make_model(), decay=0.9, num_updates="auto")
        for _ in range(2):
            train_step(model, self.x)
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        buffer.seek(0)
        restored = EMAModule(make_model(), decay=0.9, num_updates="auto")
        restored.load_state_dict(torch.load(buffer, weights_only=True))
        for m in (model, restored):
            m.eval()
        self.assertTrue(torch.equal(model(self.x), restored(self.x)))
        self.assertEqual(restored.ema.num_updates, 2)

    def test_a_state_saved_before_the_first_update_loads(self):
        saved = EMAModule(make_model(), decay=0.9, num_updates="auto").state_dict()
        restored = EMAModule(make_model(), decay=0.9, num_updates="auto")
        restored.load_state_dict(saved)
        self.assertEqual(restored.ema.num_updates, 0)
        train_step(restored, self.x)
        self.assertEqual(restored.ema.num_updates, 1)

    def test_its_own_empty_state_handed_back_is_refused_with_the_call_order(self):
        # what torch.distributed.checkpoint leaves in a fresh EMAModule: nothing to load into
        model = EMAModule(make_model(), decay=0.9, num_updates="auto")
        state = model.state_dict()
        state["_extra_state"]["num_updates"].fill_(7)    # as DCP fills the count in place
        for attempt in range(2):                         # refused again, not let through
            with self.assertRaisesRegex(ValueError, r"one update\(\) of the EMAModule"):
                model.load_state_dict(state)
            self.assertEqual(model.ema.num_updates, 0)
        model.update()                                   # the documented order
        state = model.state_dict()
        model.load_state_dict(state)
        self.assertEqual(model.ema.num_updates, 1)

    def test_to_moves_the_averages(self):
        model = EMAModule(make_model(), decay=0.9)
        train_step(model, self.x)
        model.to(torch.float32)
        model.to("cpu")
        train_step(model, self.x)

    @unittest.skipUnless(torch.cuda.is_available(), "no CUDA device")
    def test_cuda(self):
        model = EMAModule(make_model(), decay=0.9)
        train_step(model, self.x)
        model.cuda()
        train_step(model, self.x.cuda())
        self.assertEqual(model.ema.average("0.weight").device.type, "cuda")
