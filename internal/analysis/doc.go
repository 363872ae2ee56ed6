// Package analysis gates each rollout wave on SLOs read from Prometheus,
// Flagger/Argo Rollouts style:
//
//   - query templates: an SLO query is a Go template expanded with the
//     wave's namespaces (.Namespaces, a regex), the target revision
//     (.Revision) and the analysis interval (.Interval); admission
//     (webhooks) uses the same parser and checks.
//   - Provider: one PromQL instant query → one finite number, or an error
//     saying why there is none (unreachable, timeout, no data, several
//     series, NaN, ±Inf), which is Inconclusive and never a pass. Prometheus
//     is the implementation over client_golang's HTTP API.
//   - Evaluate and Judge: a verdict per SLO (Pass when min ≤ value ≤ max),
//     as the status.rollout.analysis entries plus a message.
//   - Decide: the pure per-wave state machine (Promote, Continue, Hold,
//     Rollback) over a State the controller keeps in status.
//
// Without spec.analysis.slos the default SLO is l4-success ≥ 0.99 on the
// node agent's meshkeeper_agent_connections_total.
package analysis
