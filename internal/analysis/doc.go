// Package analysis gates each rollout wave on SLOs read from Prometheus,
// Flagger/Argo Rollouts style:
//
//   - query templates: an SLO query is a Go template expanded with the
//     wave's scope: .Nodes (a node wave's nodes), .Revision and .Baseline
//     (the new and the old revision), .Namespaces (a regex of the wave's
//     namespaces) and .Interval; admission (webhooks) uses the same parser
//     and checks. Scope holds the wave's data and its baseline's (the same
//     query on the old side: the other nodes, the old revision).
//   - Provider: one PromQL instant query → one finite number with the
//     labels of its series, or an error saying why there is none
//     (unreachable, timeout, no data, several series, NaN, ±Inf), which is
//     Inconclusive and never a pass. Prometheus is the implementation over
//     client_golang's HTTP API.
//   - EvaluateScope and Judge: a verdict per SLO (Pass when min ≤ value ≤
//     max and, with maxDegradation, when the wave is not worse than its
//     baseline by more than that), as the status.rollout.analysis entries.
//   - Decide: the pure per-wave state machine (Promote, Continue, Hold,
//     Rollback) over a State the controller keeps in status, with
//     failureLimit and inconclusiveLimit.
//
// Without spec.analysis.slos the default SLO is l4-success ≥ 0.99 on the
// node agent's meshkeeper_agent_connections_total, on a node wave's nodes
// or on the pods of the new revision (DefaultL4SuccessQuery).
package analysis
