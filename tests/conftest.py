
import torch  # noqa: E402

# The env var only applies if torch was not imported yet; tiny matmuls on 2 busy cores run ~100x
# slower with two OpenMP threads than with one.
torch.set_num_threads(1)
