"""remote_autograd: train a PyTorch model whose middle part runs on another machine.

trunk = RemoteModule("127.0.0.1:50051")        # the trunk runs on the server
model = nn.Sequential(bottom, trunk, top)
loss_fn(model(x), y).backward()                # top -> trunk (Backward RPC) -> bottom
"""

__version__ = "0.1.0"

from .adapters import AdapterEngine, AdapterOptions  # noqa: E402
from .codec import Decoder, Encoder, decode, encode  # noqa: E402
from .errors import (  # noqa: E402
    AuthenticationError,
    CodecError,
    ContextNotFound,
    DeadlineExceeded,
    InvalidRequest,
    LimitExceeded,
    NotConfigured,
    RemoteAutogradError,
    RemoteError,
    ServerUnavailable,
    StaleContext,
    SteppedTrunkWarning,
    TransportError,
    TrunkError,
    TrunkMismatch,
)
from .fingerprint import trunk_fingerprint  # noqa: E402
from .module import RemoteModule  # noqa: E402
from .optim import RemoteOptimizer, clip_grad_norm_  # noqa: E402
from .options import ClientOptions, Limits, ServerOptions  # noqa: E402
from .pipeline import PipelinedStep, split_batch  # noqa: E402
from .server import TrunkServer, serve  # noqa: E402

__all__ = [
    "AdapterEngine",
    "AdapterOptions",
    "AuthenticationError",
    "ClientOptions",
    "CodecError",
    "ContextNotFound",
    "DeadlineExceeded",
    "Decoder",
    "Encoder",
    "InvalidRequest",
    "LimitExceeded",
    "Limits",
    "NotConfigured",
    "PipelinedStep",
    "RemoteAutogradError",
    "RemoteError",
    "RemoteModule",
    "RemoteOptimizer",
    "ServerOptions",
    "ServerUnavailable",
    "StaleContext",
    "SteppedTrunkWarning",
    "TransportError",
    "TrunkError",
    "TrunkMismatch",
    "TrunkServer",
    "clip_grad_norm_",
    "decode",
    "encode",
    "serve",
    "split_batch",
    "trunk_fingerprint",
]
