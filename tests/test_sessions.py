"""Client sessions on the server: an idle session expires after ServerOptions.session_ttl and
takes everything it held with it (contexts, gradients, optimizer, bulk connections).

No test races a short ttl: a session is made idle by moving its ``last_seen`` back past the
ttl, then expired by ``sessions.expire()`` (what the server's sweeper calls). One test checks
that the sweeper calls it, with a session that has nothing left to do.
"""

from __future__ import annotations

import time

import pytest
import torch
from models import Scale
from polling import wait_for
from torch import nn

from remote_autograd import (
    ClientOptions,
    ContextNotFound,
    NotConfigured,
    RemoteModule,
    RemoteOptimizer,
    ServerOptions,
)

MiB = 1 << 20


def _idle(server, remote: RemoteModule) -> None:
    """Make the session of ``remote`` look idle for longer than session_ttl, and expire it."""
    session = next(
        s for s in server.engine.sessions.values() if s.key.endswith(remote.client.session_id)
    )
    session.last_seen -= server.options.session_ttl + 1
    assert server.engine.sessions.expire() == 1


def test_the_sweeper_expires_idle_sessions(start_server):
    server = start_server(Scale(torch.float64), ServerOptions(session_ttl=0.3))
    remote = RemoteModule(server.address)
    remote.client.info()
    wait_for(lambda: server.stats()["sessions"] == 0)
    x = torch.ones(2, dtype=torch.float64)
    assert torch.equal(remote(x), x * 1.5)  # the client goes on in a new session


def test_an_idle_session_expires_with_its_contexts_gradients_and_optimizer(start_server):
    torch.manual_seed(0)
    server = start_server(nn.Linear(4, 4).double())
    remote = RemoteModule(server.address, options=ClientOptions(recover_contexts=False))
    optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
    x = torch.ones(2, 4, dtype=torch.float64, requires_grad=True)
    remote(x).sum().backward()  # gradients held by the session
    kept = remote(x)  # a context held by the session
    assert server.stats()["contexts"] == 1 and server.stats()["sessions"] == 1
    _idle(server, remote)
    assert server.stats()["sessions"] == 0
    # Its cleanup ran with it: the context (whose ttl is the default 600 s) is gone too.
    assert server.stats()["contexts"] == 0 and server.stats()["context_bytes"] == 0
    with pytest.raises(ContextNotFound, match=r"no forward context \(its session ended\)"):
        kept.sum().backward()
    with pytest.raises(NotConfigured, match="Step before ConfigureOptimizer"):
        optimizer.step()  # the optimizer went with the session


def test_a_session_in_use_does_not_expire(start_server):
    server = start_server(Scale(torch.float64))
    remote = RemoteModule(server.address)
    remote(torch.ones(2, dtype=torch.float64, requires_grad=True)).sum().backward()
    session = server.engine.sessions.values()[0]
    session.last_seen -= server.options.session_ttl - 60  # idle, but not for session_ttl
    assert server.engine.sessions.expire() == 0
    remote(torch.ones(2, dtype=torch.float64, requires_grad=True)).sum().backward()
    assert session.last_seen > time.monotonic() - 60  # each call counts as use
    assert server.stats()["sessions"] == 1 and set(session.grads) == {"weight"}


def test_an_expired_session_closes_its_bulk_connections(start_server):
    server = start_server(Scale(torch.float64))
    remote = RemoteModule(server.address)
    x = torch.randn(MiB // 8, dtype=torch.float64)  # 1 MiB: over bulk_min_bytes
    assert torch.equal(remote(x), x * 1.5)
    assert remote.client.stats.bulk_calls == 1 and len(server.service.bulk) == 1
    _idle(server, remote)
    assert len(server.service.bulk) == 0
    assert torch.equal(remote(x), x * 1.5)  # a new session, which opens a new connection


def test_other_sessions_churn_does_not_flush_what_a_lost_context_had_answered():
    """A context that answered a Backward, then went away (expired, evicted), is re-created
    by its client for the Backward's retry (its reply was lost): the server must still know
    that the Backward was answered, or the retry adds the gradients a second time. Another
    session releasing thousands of contexts meanwhile must not push that record out; the
    session's end does."""
    from remote_autograd.contexts import ContextCache, ForwardContext

    cache = ContextCache(max_contexts=8, max_bytes=1 << 20, ttl=60.0)

    def context(session: str, request_id: str) -> ForwardContext:
        return ForwardContext(request_id, session, [], [], None, 0, 0)

    answered = context("b", "lost")
    cache.put(answered)
    answered.backward_seq = 1  # its Backward #1 was answered (the reply then lost)
    cache.release("b", ["lost"])
    for index in range(5000):
        cache.put(context("a", f"churn-{index}"))
        cache.release("a", [f"churn-{index}"])
    assert cache.answered("b", "lost") == (1, False)
    assert cache.answered("a", "churn-0") == (0, False)  # answered nothing: nothing to keep
    cache.drop_session("b")
    assert cache.answered("b", "lost") == (0, False)


def test_contexts_dropped_for_an_offloaded_adapter_keep_what_they_had_answered():
    """Per-client adapters drop a live session's contexts when its adapter leaves the device
    (drop_session(ended=False)): its client may still retry a Backward whose reply was lost on
    a re-created context, which must not add its gradients twice. Only a session's end
    forgets them."""
    from remote_autograd.contexts import ContextCache, ForwardContext

    cache = ContextCache(max_contexts=8, max_bytes=1 << 20, ttl=60.0)
    context = ForwardContext("lost", "b", [], [], None, 0, 0)
    cache.put(context)
    context.backward_seq = 2
    cache.drop_session("b", ended=False)
    assert cache.answered("b", "lost") == (2, False)
    cache.drop_session("b")
    assert cache.answered("b", "lost") == (0, False)


def test_records_of_answered_backwards_are_kept_for_a_bounded_number_of_sessions():
    """A session that ends while a Backward of it is answered gets its record again after
    its end dropped them (the reply is kept after the context went): the sessions with
    records are bounded, the oldest forgotten first."""
    from remote_autograd.contexts import _REMEMBER_SESSIONS, ContextCache, ForwardContext

    cache = ContextCache(max_contexts=8, max_bytes=1 << 20, ttl=60.0)
    for index in range(_REMEMBER_SESSIONS + 100):
        session = f"ended-{index}"
        context = ForwardContext("r", session, [], [], None, 0, 0)
        cache.put(context)
        context.backward_seq = 1
        cache.drop_session(session)
        cache.keep_reply(context, None, 0)  # its Backward's reply, after the session's end
    assert len(cache._answered) == _REMEMBER_SESSIONS
    assert cache.answered(f"ended-{_REMEMBER_SESSIONS + 99}", "r") == (1, False)
    assert cache.answered("ended-0", "r") == (0, False)
