"""Mutation check: does the test suite notice when a documented behaviour breaks?

Each mutation below is a one-line change to the library that breaks one documented behaviour,
with the tests that should fail because of it. For each, the script applies the change to a
temporary copy of the repository (the working tree is never touched), runs those tests there,
and reports KILLED (a test failed, as it should) or SURVIVED (the suite did not notice), then
restores the file in the copy.

    python scripts/mutation_check.py            # every mutation
    python scripts/mutation_check.py --list     # names and what each breaks
    python scripts/mutation_check.py --only int8_truncates --only bearer_scheme
    python scripts/mutation_check.py --json results.json

A mutation names its target as (file, exact snippet): the snippet must occur exactly once in
the file, so a restructured library makes the script stop with a clear message naming the
mutation to re-point, instead of silently testing nothing. Before the mutations, the listed
tests run once on the unmodified copy (``--skip-baseline`` skips that): a test failing there
would make every KILLED meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    original: str  # exact text, found exactly once in the file
    replacement: str
    tests: tuple[str, ...]  # pytest node ids that must fail
    breaks: str  # the documented behaviour it breaks


M = Mutation
MUTATIONS: list[Mutation] = [
    # -- the eight changes of the audit (issue #12) -----------------------------------------
    M(
        "retried_backward_accumulates_twice",
        "remote_autograd/engine.py",
        "context.backward_seq = call.seq",
        "context.backward_seq = context.backward_seq",
        (
            "tests/test_faults.py::test_a_lost_reply_of_a_later_micro_batch_is_not_accumulated_twice",
        ),
        "a retried Backward is applied exactly once",
    ),
    M(
        "load_state_accepts_nan",
        "remote_autograd/validate.py",
        "        if not _finite_as(value, named[name]):\n            raise InvalidRequest(\n",
        "        if False:\n            raise InvalidRequest(\n",
        ("tests/test_limits.py::test_load_state_refuses_non_finite_parameters",),
        "LoadState refuses non-finite parameters",
    ),
    M(
        "reply_quantization_ignored",
        "remote_autograd/service.py",
        'quantization=quantization or "none"',
        'quantization="none"',
        ("tests/test_split_training.py::test_wire_quantization_end_to_end",),
        "the server encodes replies with the requested reply_quantization",
    ),
    M(
        "not_found_is_trunk_error",
        "remote_autograd/errors.py",
        "grpc.StatusCode.NOT_FOUND: ContextNotFound,",
        "grpc.StatusCode.NOT_FOUND: TrunkError,",
        ("tests/test_errors.py::test_every_status_code_is_translated",),
        "NOT_FOUND becomes ContextNotFound",
    ),
    M(
        "bearer_scheme_unchecked",
        "remote_autograd/tokens.py",
        'return matches[0] if scheme.lower() == "bearer" and matches else None',
        "return matches[0] if matches else None",
        ("tests/test_security.py::test_the_token_must_come_with_the_bearer_scheme",),
        "tokens are accepted only with the Bearer scheme",
    ),
    M(
        "expired_session_keeps_contexts",
        "remote_autograd/engine.py",
        "self.contexts.drop_session(key)",
        "pass",
        (
            "tests/test_sessions.py::"
            "test_an_idle_session_expires_with_its_contexts_gradients_and_optimizer",
        ),
        "an expired session's contexts go with it",
    ),
    M(
        "zero_grad_to_zero_does_nothing",
        "remote_autograd/sessions.py",
        "grad.zero_()",
        "pass",
        ("tests/test_optim.py::test_zero_grad_set_to_none_false_zeroes_the_trunk_gradients",),
        "zero_grad(set_to_none=False) zeroes the trunk's gradients",
    ),
    M(
        "int8_truncates",
        "remote_autograd/quantize.py",
        "scaled.round_()",
        "scaled.trunc_()",
        ("tests/test_codec.py::test_int8_rounds_to_nearest_within_half_a_step_of_its_block",),
        "int8 rounds to nearest (error <= scale / 2)",
    ),
    # -- more documented behaviours ------------------------------------------------------------
    M(
        "step_not_replayed",
        "remote_autograd/engine.py",
        "if call.step == session.last_step and call.step > 0:",
        "if False:",
        ("tests/test_faults.py::test_a_lost_reply_is_retried_and_applied_once",),
        "a retried Step is answered as a replay, applied once",
    ),
    M(
        "grad_scale_not_checked",
        "remote_autograd/sessions.py",
        "if not math.isfinite(grad_scale):",
        "if False:",
        ("tests/test_limits.py::test_a_non_finite_clip_scale_never_reaches_the_gradients",),
        "a non-finite clip scale is refused before it touches the gradients",
    ),
    M(
        "contexts_not_bound_to_sessions",
        "remote_autograd/contexts.py",
        "return (session, request_id)",
        'return ("", request_id)',
        (
            "tests/test_security.py::test_a_client_cannot_touch_another_clients_contexts",
            "tests/test_shares.py::test_the_same_request_id_in_two_sessions_names_two_contexts",
        ),
        "one session cannot use another's contexts; request ids live inside their session",
    ),
    M(
        "max_payload_bytes_unchecked",
        "remote_autograd/codec.py",
        "if size > limits.max_payload_bytes:",
        "if False:",
        ("tests/test_limits.py::test_frame_limits_are_named",),
        "frames over max_payload_bytes are refused",
    ),
    M(
        "stale_weights_answered",
        "remote_autograd/engine.py",
        "if context.weights_version != self.weights_version:",
        "if False:",
        (
            "tests/test_concurrency.py::"
            "test_a_step_that_stopped_waiting_makes_the_old_forward_stale",
        ),
        "a Backward through weights stepped since its forward is refused",
    ),
    M(
        "backward_order_unchecked",
        "remote_autograd/engine.py",
        "if call.seq != context.backward_seq + 1:",
        "if False:",
        ("tests/test_errors.py::test_backward_header_is_checked_against_its_forward",),
        "Backwards of one context come in sequence",
    ),
    M(
        "backward_needs_count_unchecked",
        "remote_autograd/engine.py",
        "if len(needs) != len(context.inputs):",
        "if False:",
        ("tests/test_errors.py::test_backward_header_is_checked_against_its_forward",),
        "Backward's needs_input_grad has one flag per input",
    ),
    M(
        "integer_input_may_need_grad",
        "remote_autograd/runner.py",
        "if not leaf.is_floating_point():",
        "if False:",
        ("tests/test_errors.py::test_compute_refuses_an_integer_input_that_needs_a_gradient",),
        "an integer input cannot need a gradient (InvalidRequest)",
    ),
    M(
        "unsendable_reply_not_translated",
        "remote_autograd/service.py",
        "except codec.CodecError as exc:\n            raise TrunkError(",
        "except KeyError as exc:\n            raise TrunkError(",
        ("tests/test_errors.py::test_a_trunk_returning_what_cannot_be_sent_is_a_trunk_error",),
        "a trunk output that cannot be sent is a TrunkError",
    ),
    M(
        "remote_clipping_removed",
        "remote_autograd/optim.py",
        "remote.client.scale_grads_later(coefficient)",
        "pass",
        (
            "tests/test_split_training.py::test_training_matches_local",
            "tests/test_optim.py::test_clip_grad_norm_clips_like_torch",
        ),
        "clip_grad_norm_ scales the trunk's gradients too",
    ),
    M(
        "clip_error_if_nonfinite_ignored",
        "remote_autograd/optim.py",
        "if error_if_nonfinite and not bool(torch.isfinite(total_norm)):",
        "if False:",
        ("tests/test_optim.py::test_clip_grad_norm_error_if_nonfinite",),
        "clip_grad_norm_(error_if_nonfinite=True) raises on a non-finite norm",
    ),
    M(
        "scheduled_lr_not_sent",
        "remote_autograd/optim.py",
        "self.client.step(self._step_count, self._hyperparameters())",
        "self.client.step(self._step_count, [{}])",
        (
            "tests/test_api.py::test_remote_optimizer_quacks_like_a_torch_optimizer",
            "tests/test_api.py::test_scheduled_learning_rates_reach_the_server_weights",
        ),
        "a scheduler's lr reaches the server's optimizer with each step",
    ),
    M(
        "deadline_is_plain_transport_error",
        "remote_autograd/errors.py",
        "grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,",
        "grpc.StatusCode.DEADLINE_EXCEEDED: TransportError,",
        ("tests/test_errors.py::test_a_call_past_client_options_timeout_is_deadline_exceeded",),
        "a call past ClientOptions.timeout raises DeadlineExceeded",
    ),
    M(
        "session_ttl_never_expires",
        "remote_autograd/sessions.py",
        "stale = [key for key, s in self._items.items() if s.last_seen <= deadline]",
        "stale = []",
        (
            "tests/test_sessions.py::test_the_sweeper_expires_idle_sessions",
            "tests/test_sessions.py::"
            "test_an_idle_session_expires_with_its_contexts_gradients_and_optimizer",
        ),
        "an idle session is dropped after session_ttl",
    ),
    M(
        "session_bulk_cap_unchecked",
        "remote_autograd/bulk.py",
        "if held >= self.max_session_connections:",
        "if False:",
        ("tests/test_bulk.py::test_max_session_bulk_connections",),
        "max_session_bulk_connections caps one session's bulk connections",
    ),
    M(
        "handshake_cap_unchecked",
        "remote_autograd/bulk.py",
        "full = self._handshaking >= _MAX_HANDSHAKES",
        "full = False",
        ("tests/test_bulk.py::test_connections_presenting_tickets_at_once_are_capped",),
        "at most _MAX_HANDSHAKES connections present tickets at once",
    ),
    M(
        "checkpoint_without_path_unexplained",
        "remote_autograd/engine.py",
        "        if not self.options.checkpoint_path:\n            raise NotConfigured(",
        "        if False:\n            raise NotConfigured(",
        ("tests/test_checkpoint.py::test_checkpoint_without_a_path_is_refused",),
        "Checkpoint on a server without a path is refused, saying so",
    ),
    M(
        "checkpoint_format_unchecked",
        "remote_autograd/checkpoint_file.py",
        'if not isinstance(state, dict) or state.get("format") != FORMAT:',
        "if not isinstance(state, dict):",
        (
            "tests/test_checkpoint.py::"
            "test_a_file_that_is_not_a_checkpoint_stops_the_server_from_starting",
        ),
        "a checkpoint file of another format is refused",
    ),
    M(
        "sigterm_not_handled",
        "remote_autograd/cli.py",
        "signal.signal(signal.SIGTERM, stop)",
        "pass",
        (
            "tests/test_checkpoint.py::"
            "test_sigterm_stops_the_cli_server_gracefully_with_a_last_checkpoint",
        ),
        "SIGTERM stops the CLI server gracefully, saving a last checkpoint",
    ),
    M(
        "server_dtype_input_not_cast",
        "remote_autograd/runner.py",
        "return tensor.to(self.dtype)",
        "return tensor",
        (
            "tests/test_split_training.py::test_a_half_precision_server_dtype_computes_like_the_cast_local_trunk",
        ),
        "ServerOptions.dtype runs the trunk in that dtype",
    ),
    M(
        "load_state_nan_in_optimizer_state",
        "remote_autograd/engine.py",
        'check_finite_tree(state.get("state"), "optimizer state")',
        "pass",
        ("tests/test_limits.py::test_non_finite_grad_scale_and_optimizer_state_are_refused",),
        "LoadState refuses non-finite optimizer state",
    ),
    M(
        "streamed_inflight_not_returned",
        "remote_autograd/service.py",
        "self.used -= nbytes",
        "pass",
        (
            "tests/test_fuzz.py::test_lying_tensor_headers_are_refused_before_allocating",
            "tests/test_limits.py::test_frame_limits_are_named",
        ),
        "a streamed frame's max_inflight_bytes reservation ends with its call",
    ),
    M(
        "release_ignored",
        "remote_autograd/contexts.py",
        "context = self._items.pop(_key(session, request_id), None)",
        "context = None",
        ("tests/test_split_training.py::test_contexts_are_released_and_no_grad_keeps_nothing",),
        "contexts the client's graph no longer needs are released",
    ),
    M(
        "resume_skips_trunk_weights",
        "remote_autograd/hf/checkpoint.py",
        'trunk.load_remote_state_dict(state["trunk"])',
        "pass",
        ("tests/test_hf_train.py::test_resume_continues_with_the_losses_of_an_uninterrupted_run",),
        "a resumed run restores the trunk's weights",
    ),
    # -- shares between clients (issue #10) ------------------------------------------------
    M(
        "identity_session_share_unchecked",
        "remote_autograd/sessions.py",
        "if identity is not None and self._count_locked(identity) >= self.max_per_identity:",
        "if False:",
        ("tests/test_shares.py::test_one_identity_cannot_take_every_session",),
        "one identity holds at most max_sessions_per_identity sessions",
    ),
    M(
        "info_creates_a_session",
        "remote_autograd/service.py",
        "self.identity(context)  # authenticated, but no session",
        "self.session(context)  #",
        ("tests/test_shares.py::test_info_calls_hold_no_session",),
        "Info calls hold no session slot",
    ),
    M(
        "closed_client_keeps_its_session",
        "remote_autograd/service.py",
        "self.engine.end_session(self.identity(context), _session_id(context))",
        "False",
        ("tests/test_shares.py::test_a_closed_client_gives_its_session_back",),
        "a closed client ends its session at once",
    ),
    M(
        "certificates_without_a_cn_are_one_identity",
        "remote_autograd/service.py",
        "return [value for value in auth.get(key, ()) if value]",
        "return list(auth.get(key, ()))",
        ("tests/test_adapters.py::test_under_mutual_tls_each_certificate_has_its_own_adapter",),
        "a client certificate without a CN is named by its SANs or fingerprint",
    ),
    M(
        "open_bulk_ticket_outlives_its_session",
        "remote_autograd/service.py",
        "if not self.engine.sessions.holds(session):",
        "if False:",
        ("tests/test_bulk.py::test_a_session_ending_while_its_ticket_is_issued_keeps_no_ticket",),
        "a ticket issued as its session ends is voided",
    ),
    M(
        "loaded_state_drops_the_configured_flags",
        "remote_autograd/engine.py",
        'keep_configured_flags(state["param_groups"], current)',
        "pass",
        (
            "tests/test_trunk_safety.py::"
            "test_flags_that_shape_the_optimizer_state_cannot_change_in_a_load",
        ),
        "a loaded optimizer state keeps the configured foreach and fused",
    ),
    M(
        "loaded_optimizer_state_unchecked",
        "remote_autograd/engine.py",
        "check_optimizer_state(state, optimizer)",
        "pass",
        (
            "tests/test_trunk_safety.py::"
            "test_an_optimizer_state_holding_more_than_an_optimizer_keeps_is_refused",
        ),
        "a loaded optimizer state holds no more than an optimizer keeps",
    ),
    M(
        "failed_sliced_call_keeps_contexts",
        "remote_autograd/chunks.py",
        "            self.release()\n            raise",
        "            raise",
        (
            "tests/test_chunks.py::"
            "test_a_sliced_call_that_fails_releases_every_slice_and_joins_no_plain_values",
        ),
        "a failed sliced call releases every slice's context",
    ),
    M(
        "remote_outputs_are_views",
        "remote_autograd/function.py",
        "outputs = [_not_a_view(output) for output in call.forward(tensors)]",
        "outputs = call.forward(tensors)",
        (
            "tests/test_split_training.py::"
            "test_a_top_that_changes_the_trunks_output_in_place_trains_as_locally",
        ),
        "the trunk's outputs may be changed in place",
    ),
    M(
        "offload_keeps_the_step_backup",
        "remote_autograd/adapters.py",
        "adapter.engine.step_backup = StepBackup()",
        "pass",
        ("tests/test_adapters.py::test_idle_adapters_move_off_the_device_and_come_back",),
        "offloading an adapter frees its step backup",
    ),
    M(
        "release_makes_a_session",
        "remote_autograd/service.py",
        "if session_key(identity, session_id) not in self.engine.sessions:",
        "if False:",
        ("tests/test_shares.py::test_a_closed_client_gives_its_session_back",),
        "a Release into no session makes none",
    ),
    M(
        "pipeline_error_leaves_a_mix",
        "remote_autograd/pipeline.py",
        "for i in sorted(trunk_back):",
        "for i in []:",
        (
            "tests/test_pipeline.py::"
            "test_an_error_in_the_loss_leaves_every_part_with_the_same_micro_batches",
        ),
        "after an error every part holds the same micro-batches",
    ),
    M(
        "token_calls_on_the_shared_threads",
        "remote_autograd/tokens.py",
        "run.experimental_thread_pool = pool  # type: ignore[attr-defined]",
        "pass",
        (
            "tests/test_security.py::test_one_tokens_calls_held_open_take_no_other_tokens_threads"
            "[/remote_autograd.v1.Trunk/Compute]",
        ),
        "each token's calls run on threads of its own",
    ),
    M(
        "views_pin_their_whole_frame",
        "remote_autograd/codec.py",
        "if frame_bytes - used <= max(_PIN_SLACK, used // 16):",
        "if True:",
        ("tests/test_memory.py::test_a_value_that_views_a_small_part_of_its_frame_is_copied_out",),
        "a kept input holds no more of its frame than it counts",
    ),
    M(
        "dropped_clients_keep_their_sessions",
        "remote_autograd/client.py",
        "weakref.finalize(self, _end_dropped_session, self._leftovers).atexit = False",
        "pass",
        ("tests/test_habits_process.py::test_dropped_copies_end_their_sessions",),
        "a dropped copy ends its session",
    ),
    M(
        "prune_closes_calls_waiting_for_a_worker",
        "remote_autograd/bulk.py",
        '_HUNG_UP = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR',
        "_HUNG_UP = select.POLLIN | select.POLLHUP | select.POLLERR",
        ("tests/test_bulk.py::test_a_call_waiting_for_a_worker_keeps_its_bulk_connection",),
        "prune leaves a connection whose call waits for a worker",
    ),
    M(
        "empty_shard_norm_raises",
        "remote_autograd/engine.py",
        "whole = [g for g in grads if g.numel()]",
        "whole = list(grads)",
        ("tests/test_distributed.py::test_gradient_norms_over_empty_shards_are_the_local_ones",),
        "gradient norms over empty fsdp shards",
    ),
    M(
        "identity_context_share_unchecked",
        "remote_autograd/contexts.py",
        "self._make_room_for_identity_locked(identity, context.nbytes)",
        "pass",
        ("tests/test_shares.py::test_one_identity_cannot_push_out_the_contexts_of_another",),
        "one identity holds at most max_identity_contexts contexts (its own oldest go)",
    ),
    M(
        "identity_inflight_share_unchecked",
        "remote_autograd/service.py",
        "if owner is not None and held + nbytes > self.owner_limit:",
        "if False:",
        ("tests/test_shares.py::test_one_identity_cannot_hold_every_byte_in_flight",),
        "one identity holds at most max_identity_inflight_bytes of frames in flight",
    ),
    M(
        "overdue_sessions_waited_for_every_step",
        "remote_autograd/turns.py",
        "key != session and key not in self._overdue",
        "key != session",
        ("tests/test_shares.py::test_a_forward_that_never_gets_its_backward_costs_one_budget",),
        "a forward that never gets its Backward costs the others one step_wait budget",
    ),
    M(
        "health_unreachable_while_draining",
        "remote_autograd/server.py",
        "if grace:  # health answers NOT_SERVING",
        "if False:  #",
        ("tests/test_shares.py::test_health_says_not_serving_while_calls_drain",),
        "health answers NOT_SERVING for the whole grace period of a shutdown",
    ),
    M(
        "checkpoint_rpc_not_paced",
        "remote_autograd/engine.py",
        "wait = self._asked + self.interval - now",
        "wait = 0.0",
        ("tests/test_shares.py::test_the_checkpoint_rpc_is_rate_limited",),
        "Checkpoint RPCs at most one per min_checkpoint_interval",
    ),
    # -- memory bounds and the trunk's buffers (issue #10) ------------------------------------
    M(
        "saved_activations_not_counted",
        "remote_autograd/engine.py",
        "with footprint.saved() if graph else contextlib.nullcontext():",
        "with contextlib.nullcontext():",
        ("tests/test_memory.py::test_a_kept_forward_counts_its_saved_activations",),
        "max_context_bytes counts the activations a kept forward saved",
    ),
    M(
        "saved_tensors_kept_with_their_history",
        "remote_autograd/footprint.py",
        "return tensor.detach()",
        "return tensor",
        ("tests/test_memory.py::test_used_forwards_leave_nothing_behind_in_rss",),
        "counting saved tensors leaks nothing (no reference cycle through grad_fn)",
    ),
    M(
        "training_forward_buffers_unchecked",
        "remote_autograd/engine.py",
        "check_finite_buffers(moved)",
        "moved.clear()",
        (
            "tests/test_trunk_safety.py::"
            "test_a_training_forward_cannot_make_the_trunks_buffers_non_finite",
        ),
        "a training forward cannot make the trunk's buffers non-finite",
    ),
    M(
        "step_of_an_ended_session_lands",
        "remote_autograd/engine.py",
        "                if not self.sessions.holds(session):",
        "                if False:",
        ("tests/test_shares.py::test_a_step_whose_session_ends_while_it_waits_moves_nothing",),
        "a Step whose session ended while it waited for its turn moves no weight",
    ),
    M(
        "one_gradient_tensor_for_several_parameters",
        "remote_autograd/runner.py",
        "        return _own_memory(list(results[: len(inputs)]), param_grads)",
        "        return list(results[: len(inputs)]), param_grads",
        (
            "tests/test_split_training.py::"
            "test_parameters_given_one_gradient_tensor_accumulate_as_locally",
        ),
        "parameters that autograd gives one gradient tensor accumulate as they do locally",
    ),
    M(
        "autograd_grad_accumulates_in_the_trunk",
        "remote_autograd/function.py",
        "        frozen = self.frozen() or not parameters",
        "        frozen = self.frozen()",
        (
            "tests/test_split_training.py::"
            "test_backward_reaches_the_trunks_gradients_only_where_it_would_locally",
        ),
        "torch.autograd.grad(loss, x) and backward(inputs=[x]) leave the trunk's gradients alone",
    ),
    M(
        "forward_of_an_ended_session_keeps_its_context",
        "remote_autograd/engine.py",
        "            if not self.sessions.holds(session):\n                # Ended (EndSession",
        "            if False:\n                # Ended (EndSession",
        ("tests/test_shares.py::test_a_forward_whose_session_ends_while_it_runs_keeps_no_context",),
        "a kept forward whose session ended while it ran keeps no context and no lease",
    ),
    # -- the distributed trunk (issue #14) ---------------------------------------------------
    M(
        "ddp_parts_counted_again_after_a_combine",
        "remote_autograd/distributed.py",
        "                grad.zero_()",
        "                pass",
        (
            "tests/test_distributed.py::"
            "test_gradients_keep_accumulating_across_a_grad_norm_and_a_step[ddp]",
        ),
        "ddp: each rank's part of a session's gradients counts once after a GradNorm or Step",
    ),
    M(
        "fsdp_gradients_averaged",
        "remote_autograd/sharding.py",
        "sub.set_gradient_divide_factor(1.0)",
        "sub.set_gradient_divide_factor(2.0)",
        (
            "tests/test_distributed.py::"
            "test_training_through_two_ranks_equals_one_process_and_local[fsdp]",
        ),
        "fsdp sums the shares' gradients (the client's loss), it does not average them",
    ),
    M(
        "guard_verdict_of_rank_0_alone",
        "remote_autograd/rank_wire.py",
        "        return self._all_reduce(super().max(values), dist.ReduceOp.MAX)",
        "        return super().max(values)",
        (
            "tests/test_distributed.py::"
            "test_a_step_that_would_blow_up_a_weight_is_refused_on_every_rank[fsdp]",
        ),
        "fsdp: the guard's verdict is taken over every rank's shard",
    ),
    M(
        "followers_die_with_torchrun_sigterm",
        "remote_autograd/distributed.py",
        "            signal.signal(stop, signal.SIG_IGN)",
        "            pass",
        (
            "tests/test_distributed.py::"
            "test_a_graceful_stop_saves_a_checkpoint_that_other_layouts_load",
        ),
        "a graceful stop of a distributed trunk saves a last checkpoint with every rank",
    ),
    M(
        "ddp_one_buffer_for_every_dtype",
        "remote_autograd/distributed.py",
        "groups.setdefault((part.dtype, part.device), []).append(position)",
        "groups.setdefault((torch.float64, part.device), []).append(position)",
        ("tests/test_distributed.py::test_ddp_sums_the_gradients_of_each_dtype_apart",),
        "ddp sums the ranks' gradients of each dtype in a buffer of that dtype",
    ),
    M(
        "decoded_bytes_uncounted",
        "remote_autograd/service.py",
        "growth = self.decoder.growth(received.buffer)",
        "growth = 0",
        ("tests/test_limits.py::test_what_frames_decode_to_is_bounded_by_max_decoding_bytes",),
        "what frames decode to beyond their own bytes is bounded by max_decoding_bytes",
    ),
    M(
        "sliced_forward_seeds_before_the_step",
        "remote_autograd/client.py",
        "        self._await_step()  # a Step in flight moves the counters",
        "        pass  # a Step in flight moves the counters",
        ("tests/test_optim.py::test_a_call_to_the_trunk_in_the_block_waits_for_the_step",),
        "micro_batches slices inside stepping() draw the dropout of the step after it",
    ),
    M(
        "stepping_swallows_the_steps_error",
        "remote_autograd/optim.py",
        "        if error is not None:\n            raise error\n",
        "",
        ("tests/test_optim.py::test_a_failed_step_is_raised_when_the_block_ends",),
        "stepping() raises the trunk step's error when its block ends",
    ),
    # -- session 11 ----------------------------------------------------------------------------
    M(
        "compute_seconds_count_the_wait",
        "remote_autograd/engine.py",
        "                started = time.perf_counter()  # not the wait: see compute()",
        "                pass",
        (
            "tests/test_chunks.py::test_the_seconds_a_slice_waits_for_the_trunk_are_not_counted_as_its_compute",
        ),
        "a reply's compute_seconds count the trunk's time, not the wait for it",
    ),
    M(
        "unanswered_step_not_settled",
        "remote_autograd/optim.py",
        "        if self._unsettled is not None and self._settled():",
        "        if False:",
        (
            "tests/test_optim.py::test_a_step_that_got_no_answer_is_applied_once_whatever_the_loop_does_next",
        ),
        "a step that got no answer is settled with the server before the next one",
    ),
    M(
        "lost_backward_added_twice",
        "remote_autograd/engine.py",
        "                    again = call.seq <= context.answered",
        "                    again = False",
        (
            "tests/test_faults.py::test_a_backward_whose_reply_and_context_were_lost_is_not_accumulated_twice",
        ),
        "a Backward answered by a context that went away is not added again",
    ),
    M(
        "retried_forward_moves_buffers_twice",
        "remote_autograd/engine.py",
        "                if again:\n                    restore_buffers(before)",
        "                if False:\n                    restore_buffers(before)",
        ("tests/test_faults.py::test_a_retried_training_forward_moves_batchnorm_statistics_once",),
        "a retried training Compute moves BatchNorm statistics once",
    ),
    M(
        "checkpoint_module_unchecked",
        "remote_autograd/engine.py",
        '                check_module_state(state.get("module"), self.module)',
        "                pass",
        ("tests/test_checkpoint.py::test_a_checkpoint_that_does_not_hold_is_refused_whole",),
        "a checkpoint's module state is checked before any of it is loaded",
    ),
    M(
        "recompute_forgets_its_seeds",
        "remote_autograd/module.py",
        "        call.given_seeds = seeds or None  # the first run's, for a recompute",
        "        call.given_seeds = None",
        (
            "tests/test_habits.py::test_a_recomputed_forward_without_a_seed_option_gets_its_first_runs_masks",
        ),
        "a checkpoint's recompute gets its first run's dropout seeds",
    ),
    M(
        "slices_all_equal",
        "remote_autograd/chunks.py",
        "    if extra == 0:  # base >= 2 here",
        "    if False:",
        (
            "tests/test_chunks.py::test_an_output_without_the_batch_is_refused_at_every_batch_size_or_computed_whole",
        ),
        "slices are never all equal, so a fixed-size output is refused",
    ),
    # -- session 12 ----------------------------------------------------------------------------
    M(
        "reply_quantization_checked_after_the_trunk",
        "remote_autograd/service.py",
        "        encoder = self._reply_encoder(header.reply_quantization)"
        "  # refused before it runs\n"
        '        with self._decoded(session, received, "Backward"',
        '        encoder = None\n        with self._decoded(session, received, "Backward"',
        ("tests/test_errors.py::test_a_bad_reply_quantization_is_refused_before_the_trunk_runs",),
        "a bad reply_quantization is refused before the Backward adds anything",
    ),
    M(
        "overflowing_accumulation_refused_under_grad_scaler",
        "remote_autograd/engine.py",
        "            if not report_nonfinite:\n"
        "                raise\n"
        "        # The client's GradScaler",
        "            raise\n        # The client's GradScaler",
        (
            "tests/test_habits.py::test_grad_scaler_skips_accumulated_gradients_that_overflow_only_summed",
        ),
        "accumulated gradients that overflow only summed are an overflow GradScaler skips",
    ),
    M(
        "ddp_parts_not_summed",
        "remote_autograd/rank_wire.py",
        "        self.parts = not sharded",
        "        self.parts = False",
        (
            "tests/test_distributed.py::test_ddp_gradients_that_overflow_only_summed_over_the_ranks_are_skipped_by_grad_scaler",
        ),
        "ddp gradients that overflow only summed over the ranks are skipped, not stepped",
    ),
    M(
        "double_backward_through_the_trunk",
        "remote_autograd/function.py",
        "        if torch.is_grad_enabled():\n            raise RuntimeError(",
        "        if False:\n            raise RuntimeError(",
        (
            "tests/test_habits.py::test_double_backward_through_the_trunk_is_refused_and_a_penalty_at_its_output_works",
        ),
        "create_graph=True across the trunk raises instead of dropping second-order terms",
    ),
    M(
        "clip_coefficient_zero_ignored",
        "remote_autograd/client.py",
        "            if scale == 0.0:\n                if self._pending_zero",
        "            if False:\n                if self._pending_zero",
        ("tests/test_habits.py::test_a_clip_coefficient_of_zero_reaches_the_trunk",),
        "a clip coefficient of 0 zeroes the trunk's gradients",
    ),
    M(
        "trunk_overflow_is_a_nan_norm",
        "remote_autograd/optim.py",
        "                norms.append(torch.tensor(math.inf))",
        "                norms.append(torch.tensor(math.nan))",
        (
            "tests/test_habits.py::test_amp_clipping_when_only_the_trunk_overflows_keeps_the_local_weights_finite",
        ),
        "a trunk's overflow counts as an infinite norm: local weights stay finite",
    ),
    M(
        "numpy_lr_left_out",
        "remote_autograd/optim.py",
        "                value = _number(value)\n",
        "",
        (
            "tests/test_optim.py::test_learning_rates_held_as_numpy_scalars_or_tensors_reach_the_trunk",
        ),
        "a numpy scalar learning rate reaches the server",
    ),
    M(
        "fsdp_root_stays_gathered",
        "remote_autograd/sharding.py",
        "    fully_shard(module, reshard_after_forward=True)",
        "    fully_shard(module)",
        (
            "tests/test_distributed.py::test_a_trunks_own_parameters_are_current_after_a_forward_without_grad",
        ),
        "fsdp: the trunk's own parameters are current after a forward without grad",
    ),
    M(
        "idle_ranks_time_out",
        "remote_autograd/distributed.py",
        '                commands = {rank: {"op": "alive"} for rank in range(1, self.world)}',
        "                return",
        (
            "tests/test_distributed.py::test_a_hung_rank_takes_the_trunk_out_of_service_and_torchrun_ends_it",
        ),
        "an idle distributed trunk keeps its ranks",
    ),
    M(
        "recompute_from_a_changed_input",
        "remote_autograd/function.py",
        "        if [_version(t) for t in self._inputs] != self._versions:",
        "        if False:",
        (
            "tests/test_faults.py::test_a_lost_context_is_not_recomputed_from_an_input_changed_in_place",
        ),
        "a lost context is not recomputed from an input changed in place",
    ),
    M(
        "map_keys_unchecked",
        "remote_autograd/codec.py",
        "                if not all(map(_plain_key, node)):",
        "                if False:",
        ("tests/test_codec.py::test_map_keys_must_be_plain",),
        "map keys in frames must be plain",
    ),
    M(
        "stalled_bulk_reply_waits_for_ever",
        "remote_autograd/bulk.py",
        "        connection.deadline = None if timeout is None else time.monotonic() + timeout",
        "        connection.deadline = None",
        (
            "tests/test_bulk.py::test_a_reply_stalled_on_the_way_ends_by_the_calls_deadline_and_is_retried",
        ),
        "a bulk reply stalled on the way ends by the call's deadline",
    ),
    M(
        "refused_certificate_reads_as_down",
        "remote_autograd/client.py",
        "                    tls_checked = self._raise_tls_refusal(exc)",
        "                    tls_checked = True",
        ("tests/test_security.py::test_a_refused_certificate_is_named",),
        "a refused TLS certificate is named at once",
    ),
    M(
        "peft_model_not_unwrapped",
        "remote_autograd/hf/split.py",
        "    if callable(base):",
        "    if False:",
        ("tests/test_hf_split.py::test_a_peft_model_splits_as_the_model_it_wraps",),
        "a peft PeftModel splits as the model it wraps",
    ),
    M(
        "inference_tensor_version_read",
        "remote_autograd/function.py",
        "    return None if tensor.is_inference() else tensor._version",
        "    return tensor._version",
        ("tests/test_split_training.py::test_contexts_are_released_and_no_grad_keeps_nothing",),
        "forwards under inference_mode work",
    ),
    M(
        "stand_in_follows_the_device_context",
        "remote_autograd/module.py",
        "        self._dummy = torch.zeros(1, device=_CPU, requires_grad=True)",
        "        self._dummy = torch.zeros(1, requires_grad=True)",
        (
            "tests/test_habits.py::test_a_model_built_under_a_device_context_trains_as_one_built_plainly",
        ),
        "a model built under a device context trains",
    ),
    M(
        "overflow_flag_nan",
        "remote_autograd/function.py",
        "math.inf if call.nonfinite else 0.0",
        "math.nan if call.nonfinite else 0.0",
        ("tests/test_habits.py::test_a_grad_scaler_overflow_under_anomaly_detection_is_skipped",),
        "an overflow under anomaly detection is skipped, not raised",
    ),
    M(
        "frozen_read_at_backward_only",
        "remote_autograd/module.py",
        '            "frozen": functools.partial(_frozen, not self.trunk_requires_grad, self),',
        '            "frozen": self._trunk_frozen,',
        ("tests/test_habits.py::test_a_trunk_frozen_at_its_forward_gets_no_gradient",),
        "a trunk frozen at its forward gets no gradient from it",
    ),
    M(
        "plain_port_uncertain",
        "remote_autograd/transport.py",
        '        return ("plain", text) if exc.reason in _NOT_TLS else None',
        "        return None",
        ("tests/test_security.py::test_a_tls_client_at_a_plain_text_port_is_told_at_once",),
        "a TLS client at a plain-text port is told at once",
    ),
    M(
        "staging_buffer_reused_before_read",
        "remote_autograd/codec.py",
        "                pending[-1] = bytes(pending[-1])  # the piece's buffer is reused",
        "                pass",
        (
            "tests/test_staging.py::test_staged_frames_are_the_frames_encoded_whole[torch.float32-none]",
            "tests/test_staging.py::test_split_training_through_staged_frames_equals_local[grpc-stream]",
        ),
        "a gRPC chunk spanning two staged pieces holds the first piece's bytes, not the next's",
    ),
    M(
        "staged_pieces_after_two_not_copied",
        "remote_autograd/memory.py",
        "                    start(index + 2)\n",
        "                    pass\n",
        (
            "tests/test_staging.py::test_staged_frames_are_the_frames_encoded_whole[torch.float32-none]",
            "tests/test_staging.py::test_split_training_through_staged_frames_equals_local[bulk]",
        ),
        "every piece of a staged tensor is copied and sent",
    ),
    M(
        "recompute_ignores_weights_id",
        "remote_autograd/engine.py",
        "            if call.recompute and call.weights_id and call.weights_id != weights_id:\n",
        "            if False:\n",
        ("tests/test_faults.py::test_a_recompute_never_runs_on_other_weights_of_the_same_version",),
        "a recompute runs only on the very weights its forward ran on",
    ),
    M(
        "grad_norm_of_a_dead_servers_gradients",
        "remote_autograd/engine.py",
        '        self._check_gradients_here(call.server_id, "GradNorm")\n',
        "",
        ("tests/test_faults.py::test_killed_server_restarts_from_its_checkpoint[262144]",),
        "clip_grad_norm_ after a restart is refused, not taken of the local parts alone",
    ),
    M(
        "backward_in_the_modules_current_mode",
        "remote_autograd/runner.py",
        'switched it since)."""\n        self.set_mode(training)\n',
        'switched it since)."""\n',
        ("tests/test_concurrency.py::test_a_kept_graphs_backward_runs_in_its_forwards_mode",),
        "a kept graph's backward runs in the mode of its forward",
    ),
    M(
        "optimizer_id_unchecked",
        "remote_autograd/engine.py",
        '            if call.optimizer_id and session.optimizer_id not in ("", call.optimizer_id):',
        "            if False:",
        ("tests/test_faults.py::test_a_step_of_an_optimizer_a_restart_lost_is_refused",),
        "a Step of an optimizer a restart lost is refused",
    ),
    M(
        "eval_forwards_take_training_seeds",
        "remote_autograd/client.py",
        "            if training:\n                key = f",
        "            if True:\n                key = f",
        (
            "tests/test_habits.py::test_validating_in_eval_mode_between_steps_leaves_the_dropout_masks_alone[1]",
        ),
        "an eval forward leaves the training forwards' dropout seeds alone",
    ),
    M(
        "another_threads_backward_overtakes_zero_grad",
        "remote_autograd/client.py",
        "                if carrier is None or carrier.is_set():",
        "                if True:",
        (
            "tests/test_concurrency.py::test_threads_sharing_a_remote_module_keep_each_others_gradients[1]",
        ),
        "a Backward of another thread waits for the one carrying a deferred zero_grad()",
    ),
    M(
        "offload_forgets_answered_backwards",
        "remote_autograd/contexts.py",
        "            if ended:",
        "            if True:",
        (
            "tests/test_sessions.py::test_contexts_dropped_for_an_offloaded_adapter_keep_what_they_had_answered",
        ),
        "an adapter offload keeps what its live sessions' contexts had answered",
    ),
    M(
        "recompute_from_changed_inputs",
        "remote_autograd/runner.py",
        "        if copy:",
        "        if False:",
        (
            "tests/test_split_training.py::test_a_trunk_that_changes_its_input_in_place_trains_as_locally[no-input-grad-recompute]",
        ),
        "a forward kept for recompute runs on a copy of the inputs it keeps",
    ),
    M(
        "gradients_written_by_a_refused_step_stay",
        "remote_autograd/guard.py",
        "    kept = given if _may_write_grads(optimizer, tensors) else []",
        "    kept = []",
        (
            "tests/test_trunk_safety.py::test_a_refused_step_leaves_the_gradients_an_optimizer_writes[SGD-nesterov-foreach]",
        ),
        "a refused step puts back the gradients its optimizer wrote",
    ),
    M(
        "seeds_by_rng_state_alone",
        "remote_autograd/module.py",
        "        rng = (_rng_state(), _inputs_key(tensors)) if self.training else None",
        "        rng = (_rng_state(), ()) if self.training else None",
        (
            "tests/test_habits.py::test_two_trunk_calls_from_one_rng_state_find_their_seeds[two_checkpoints-reentrant]",
        ),
        "two trunk calls from one RNG state find their own seeds at recompute",
    ),
    M(
        "outputs_without_grad_require_grad",
        "remote_autograd/function.py",
        "                if not o.is_floating_point() or (without and without[i])",
        "                if not o.is_floating_point()",
        (
            "tests/test_split_training.py::test_outputs_the_trunk_gives_without_a_graph_need_no_gradient_as_locally[1]",
        ),
        "outputs the trunk gives without a graph need no gradient, as locally",
    ),
    M(
        "refused_context_moves_buffers",
        "remote_autograd/engine.py",
        "                        self.contexts.check_size(session.key, nbytes)",
        "                        pass",
        (
            "tests/test_trunk_safety.py::test_a_kept_forward_refused_for_its_size_leaves_the_trunks_buffers_as_they_were[graph]",
        ),
        "a kept forward refused for its size leaves the shared buffers as they were",
    ),
    # -- session 15 ---------------------------------------------------------------------------
    M(
        "frozen_submodules_unfrozen_by_training",
        "remote_autograd/runner.py",
        "            for module in self.kept_in_eval if training else ():",
        "            for module in ():",
        (
            "tests/test_habits.py::test_a_submodule_served_in_eval_mode_stays_so_after_a_validation_pass",
        ),
        "a submodule served in eval mode stays so in training forwards",
    ),
    M(
        "exchange_holds_the_client",
        "remote_autograd/client.py",
        "            kw=_weakly(self._kw),",
        "            kw=self._kw,",
        ("tests/test_habits_process.py::test_dropped_copies_end_their_sessions[no_grad]",),
        "a dropped client ends its session without a garbage collection",
    ),
    M(
        "pipelined_trunk_gets_the_leaf",
        "remote_autograd/pipeline.py",
        "modifiable=not self._remote_only())",
        "modifiable=False)",
        (
            "tests/test_pipeline.py::test_a_trunk_that_changes_its_input_in_place_trains_as_in_the_plain_loop[local_trunk]",
        ),
        "a trunk that is not a bare RemoteModule may change its input in place",
    ),
    M(
        "slices_recover_at_once",
        "remote_autograd/chunks.py",
        "        call.recovering = self._recovering",
        "        pass",
        ("tests/test_chunks.py::test_slices_recover_their_lost_contexts_one_at_a_time",),
        "slices re-create lost contexts one at a time",
    ),
    M(
        "bulk_opening_unbounded_by_the_call",
        "remote_autograd/exchange.py",
        "self._bulk_connection(bulk, None if timeout is None else timeout / 2)",
        "self._bulk_connection(bulk, None)",
        ("tests/test_bulk.py::test_a_bulk_port_that_never_answers_costs_a_call_half_its_deadline",),
        "opening a bulk connection takes at most half the call's deadline",
    ),
    # -- split backward (session 16) ------------------------------------------------------
    M(
        "split_backward_ignored_by_the_step",
        "remote_autograd/pipeline.py",
        "if self.split_backward:  # the seam's gradient now",
        "if False:  # the seam's gradient now",
        (
            "tests/test_pipeline.py::"
            "test_split_backward_queues_the_trunks_backward_before_the_tops_weights",
        ),
        "PipelinedStep(split_backward=True) queues the trunk's Backward before the top's weights",
    ),
    M(
        "split_backward_leaf_below_two_nodes",
        "remote_autograd/split_backward.py",
        "self.whole = whole or not self.splits or not self._separable()",
        "self.whole = whole or not self.splits",
        (
            "tests/test_split_backward.py::test_both_passes_leave_what_one_backward_leaves_bit_for_bit",
        ),
        "a weight below two split nodes gets one plain backward (not counted twice)",
    ),
    M(
        "split_backward_root_slot_zero",
        "remote_autograd/split_backward.py",
        "slots: dict[Node, set[int]] = {root: {output_nr}}",
        "slots: dict[Node, set[int]] = {root: {0}}",
        (
            "tests/test_split_backward.py::"
            "test_a_root_that_is_a_second_output_and_a_node_given_no_gradient",
        ),
        "the loss's gradient is captured in the slot of its own output",
    ),
    M(
        "split_backward_input_grad_aliased",
        "remote_autograd/split_backward.py",
        "tensor.grad = grad.clone() if grad.is_sparse else torch.empty_like(tensor).copy_(grad)",
        "tensor.grad = grad",
        (
            "tests/test_split_backward.py::test_the_inputs_gradient_is_laid_out_as_one_backward_lays_it_out",
        ),
        "an input's gradient is a copy in its layout, as autograd's accumulator leaves it",
    ),
    # -- the step backup taken between steps (session 17) ---------------------------------
    M(
        "step_backup_ignores_versions",
        "remote_autograd/guard.py",
        "i is not None and self.tensors[i]() is now and shard._version == self.versions[i]",
        "i is not None and self.tensors[i]() is now",
        (
            "tests/test_trunk_safety.py::"
            "test_the_step_backup_uses_a_copy_taken_between_steps_only_where_nothing_changed_since",
        ),
        "a tensor written since the copy between steps is copied again",
    ),
    M(
        "step_backup_ignores_identity",
        "remote_autograd/guard.py",
        "i is not None and self.tensors[i]() is now and shard._version == self.versions[i]",
        "i is not None and shard._version == self.versions[i]",
        (
            "tests/test_trunk_safety.py::"
            "test_the_step_backup_uses_a_copy_taken_between_steps_only_where_nothing_changed_since",
        ),
        "another tensor in a prepared tensor's place is copied",
    ),
    M(
        "step_backup_not_prepared",
        "remote_autograd/guard.py",
        "    backup.prepare(_backed_up(tensors, _state_slots(optimizer, tensors)))",
        "    pass",
        (
            "tests/test_trunk_safety.py::"
            "test_a_step_refused_after_steps_that_stood_restores_exactly_what_stood",
        ),
        "a step that stands prepares the next step's copy",
    ),
    M(
        "step_backup_prepare_can_fail_the_step",
        "remote_autograd/guard.py",
        "        except Exception:  # the step has stood: this must not fail it",
        "        except MemoryError:  # the step has stood: this must not fail it",
        (
            "tests/test_trunk_safety.py::"
            "test_a_step_stands_when_no_copy_between_steps_can_be_started",
        ),
        "a copy between steps that cannot start leaves the step standing",
    ),
    M(
        "step_backup_names_by_shard_view",
        "remote_autograd/guard.py",
        "        self.tensors = [weakref.ref(t) for t in tensors]",
        "        self.tensors = [weakref.ref(t) for t in shards]",
        (
            "tests/test_trunk_safety.py::"
            "test_a_sharded_trunks_copy_between_steps_is_used_and_sees_its_shards_change",
        ),
        "a sharded trunk's copy between steps is found by its DTensors",
    ),
    M(
        "pipelined_step_ignores_its_scaler",
        "remote_autograd/pipeline.py",
        "root = scaled if self.scaler is None else self.scaler.scale(scaled)",
        "root = scaled",
        (
            "tests/test_pipeline.py::"
            "test_a_grad_scaler_scales_each_micro_batch_as_in_the_plain_loop",
        ),
        "PipelinedStep(scaler=...) scales each micro-batch's loss",
    ),
    M(
        "pipelined_step_returns_the_scaled_loss",
        "remote_autograd/pipeline.py",
        "total = scaled.detach() if total is None else total + scaled.detach()",
        "total = root.detach() if total is None else total + root.detach()",
        (
            "tests/test_pipeline.py::"
            "test_a_grad_scaler_scales_each_micro_batch_as_in_the_plain_loop",
        ),
        "PipelinedStep(scaler=...) returns the unscaled loss",
    ),
    M(
        "pipelined_step_misses_parameters_shared_with_the_lane",
        "remote_autograd/pipeline.py",
        "        self._check_shared_with_the_lane(modules)\n",
        "",
        ("tests/test_pipeline.py::test_a_parameter_shared_with_a_local_layer_of_the_trunk_warns",),
        "a parameter shared with a local layer of the trunk is warned of",
    ),
]


class SnippetNotFound(SystemExit):
    pass


def _default_python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _copy_repo(target: Path) -> Path:
    copy = target / "repo"
    ignore = shutil.ignore_patterns(
        ".git", "__pycache__", ".venv", ".pytest_cache", ".hypothesis", "runs", "*.egg-info"
    )
    shutil.copytree(ROOT, copy, ignore=ignore)
    return copy


def _check(mutation: Mutation, root: Path) -> str:
    path = root / mutation.path
    if not path.exists():
        raise SnippetNotFound(
            f"mutation {mutation.name}: {mutation.path} does not exist; re-point it"
        )
    text = path.read_text()
    count = text.count(mutation.original)
    if count != 1:
        raise SnippetNotFound(
            f"mutation {mutation.name}: the snippet {mutation.original!r} occurs {count} times "
            f"in {mutation.path} (expected exactly once); re-point it at the code that now does "
            f"this: {mutation.breaks}"
        )
    return text


def _pytest(python: str, root: Path, tests: list[str], timeout: float) -> tuple[int, str, float]:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
        PYTHONDONTWRITEBYTECODE="1",  # a mutation of the same length must not hit a stale .pyc
    )
    command = [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    started = time.monotonic()
    try:
        done = subprocess.run(
            command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return -1, "timed out", time.monotonic() - started
    return done.returncode, (done.stdout + done.stderr)[-2000:], time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME", help="run this mutation")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--json", metavar="FILE", help="write the results here")
    parser.add_argument("--python", default=_default_python(), help="interpreter for pytest")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per test run")
    parser.add_argument("--skip-baseline", action="store_true", help="no unmutated run first")
    args = parser.parse_args(argv)

    names = {m.name for m in MUTATIONS}
    assert len(names) == len(MUTATIONS), "mutation names must be unique"
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:40s} {m.path}: breaks '{m.breaks}'")
        return 0
    unknown = set(args.only or ()) - names
    if unknown:
        parser.error(f"unknown mutation(s) {sorted(unknown)}; see --list")
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]

    results = []
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        root = _copy_repo(Path(tmp))
        for mutation in chosen:  # every snippet is checked before anything runs
            _check(mutation, root)
        probe = subprocess.run(
            [args.python, "-c", "import remote_autograd; print(remote_autograd.__file__)"],
            cwd=root,
            env=dict(os.environ, PYTHONPATH=str(root)),
            capture_output=True,
            text=True,
        )
        if not probe.stdout.strip().startswith(str(root)):
            raise SystemExit(f"the copy's remote_autograd is not the one imported: {probe}")
        if not args.skip_baseline:
            tests = sorted({t for m in chosen for t in m.tests})
            code, output, seconds = _pytest(args.python, root, tests, args.timeout)
            print(f"baseline: {len(tests)} tests, rc={code} ({seconds:.0f} s)", flush=True)
            if code != 0:
                print(output)
                raise SystemExit("the tests fail without any mutation: fix them first")
        for mutation in chosen:
            path = root / mutation.path
            original = _check(mutation, root)
            path.write_text(original.replace(mutation.original, mutation.replacement))
            try:
                code, output, seconds = _pytest(
                    args.python, root, list(mutation.tests), args.timeout
                )
            finally:
                path.write_text(original)
            # rc 1: tests failed. Anything else (2 interrupted/collection error, 4 usage, 5 no
            # tests) means the node ids are wrong, not that the mutation was caught.
            verdict = {0: "SURVIVED", 1: "KILLED"}.get(code, "ERROR")
            results.append(
                {**asdict(mutation), "verdict": verdict, "returncode": code, "seconds": seconds}
            )
            print(f"{verdict:9s} {mutation.name} ({seconds:.0f} s)", flush=True)
            if verdict == "ERROR":
                print(output)
    killed = sum(r["verdict"] == "KILLED" for r in results)
    print(f"{killed}/{len(results)} killed")
    for r in results:
        if r["verdict"] != "KILLED":
            print(f"  {r['verdict']}: {r['name']} ({r['breaks']})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
