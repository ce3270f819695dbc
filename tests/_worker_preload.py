"""Imported once by dist_utils' fork server, so pool workers start with torch, dynamo and diffusers' model
classes already loaded (about 10 s of CPU per worker on the test machine) instead of importing them each."""
import torch  # noqa: F401
import torch._dynamo  # noqa: F401
import torch.distributed  # noqa: F401
import diffusers
import diffusers.models.transformers  # noqa: F401  (the lazy attribute access imports every transformer)

diffusers.FluxTransformer2DModel  # noqa: B018
