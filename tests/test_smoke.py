import numpy as np

from minipeft import Tensor, backend
from minipeft.autograd import ops


def test_sum_of_product_gradient(device):
    x = Tensor(np.arange(6.0).reshape(2, 3), requires_grad=True, dtype=np.float64, device=device)
    w = Tensor(np.ones((3, 2)), requires_grad=True, dtype=np.float64, device=device)
    ops.matmul(x, w).sum().backward()
    np.testing.assert_array_equal(backend.asnumpy(x.grad), np.full((2, 3), 2.0))
