"""Without the compiled kernel: exact updates on the torch path, and one warning that says so."""
import subprocess
import sys
import textwrap
import unittest


class FallbackTest(unittest.TestCase):
    def test_warns_once_and_stays_exact(self):
        code = textwrap.dedent("""
            import sys, warnings
            sys.modules["tfcompat_ema._fused"] = None      # as if built without a C compiler
            import numpy as np, torch
            import tfcompat_ema
            assert tfcompat_ema.fused_available() is False
            w = torch.full((5,), 3.0)
            ema = tfcompat_ema.ExponentialMovingAverage(0.9)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ema.apply({"w": w})
                w.fill_(1.0)
                ema.apply({"w": w})
                ema.apply_tensors({"loss": torch.tensor(2.0)})
            warned = [c for c in caught if c.category is RuntimeWarning]
            messages = [str(c.message) for c in warned]
            assert len(messages) == 1 and "compiled CPU kernel" in messages[0], messages
            # the user's line, not ours; a reinstall pip's wheel cache cannot short-circuit
            assert warned[0].filename == "<string>", warned[0].filename
            assert "--no-cache-dir --no-binary tfcompat-ema" in messages[0], messages
            d = np.float32(1) - np.float32(0.9)
            expected = np.float32(3) - np.float32(np.float32(3) - np.float32(1)) * d
            assert float(ema.average("w")[0]) == float(expected)
            print("ok")
        """)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])


if __name__ == "__main__":
    unittest.main()
