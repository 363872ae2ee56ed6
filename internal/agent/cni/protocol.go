// Package cni is the node side of CNI-time enrolment: the wire protocol
// between the chained CNI plugin (cmd/meshkeeper-cni) and the node agent,
// the agent's unix-socket server, and the installer that copies the plugin
// into the node's CNI bin directory and chains it into the node's CNI
// config (and removes both again).
//
// The plugin runs as a host process, called by the container runtime for
// every pod sandbox; the agent runs in a pod. So that the agent needs no
// view of the runtime's netns mounts (their paths differ between runtimes
// and are not under any directory the agent mounts), the plugin opens the
// pod's network namespace and passes the open file descriptor with its
// request (SCM_RIGHTS on a SOCK_SEQPACKET unix socket: one request and one
// response per connection, message boundaries kept by the kernel). The fd
// is exactly what the ZDS hand-off to ztunnel needs too.
//
// This package imports nothing heavy: the plugin binary links it, and a
// pod's start waits for that binary to run.
package cni

import (
	"errors"
	"time"
)

// ProtocolVersion is the version of Request and Response. The agent answers
// a request of another version with ResultError, naming both.
const ProtocolVersion = 1

// DefaultSocket is where the agent serves the plugin, on the host.
const DefaultSocket = "/var/run/meshkeeper/cni.sock"

// DefaultTimeout bounds one ADD: when the agent has not answered by then
// the ADD fails (fail closed) and the kubelet retries the sandbox.
const DefaultTimeout = 5 * time.Second

// Command is the CNI command the plugin was called with.
type Command string

const (
	CommandAdd   Command = "ADD"
	CommandDel   Command = "DEL"
	CommandCheck Command = "CHECK"
)

// Request is what the plugin sends; the pod's network namespace travels as
// an fd beside it (none when the plugin could not open it, e.g. on a DEL
// after the namespace is gone).
type Request struct {
	Version     int     `json:"version"`
	Command     Command `json:"command"`
	Namespace   string  `json:"namespace"`
	Name        string  `json:"name"`
	UID         string  `json:"uid"`
	ContainerID string  `json:"containerID,omitempty"`
	// Netns is the runtime's path of the namespace, for messages only.
	Netns string `json:"netns,omitempty"`
	// TimeoutMillis is how long the plugin waits for the answer; the agent
	// gives up a little earlier so its answer says why.
	TimeoutMillis int64 `json:"timeoutMillis,omitempty"`
}

// Result is the agent's verdict.
type Result string

const (
	// ResultEnrolled: the pod is meshed and its namespace is enrolled
	// (ADD), still enrolled (CHECK), or released (DEL).
	ResultEnrolled Result = "Enrolled"
	// ResultSkipped: the pod is not meshed (its namespace is not in the
	// mesh, it opted out with istio.io/dataplane-mode=none, ...); Message
	// says why. The plugin passes it through.
	ResultSkipped Result = "Skipped"
	// ResultError: the pod is meshed (or the agent cannot tell) and could
	// not be enrolled; the plugin fails the ADD with Message.
	ResultError Result = "Error"
)

// Response is the agent's answer.
type Response struct {
	Result  Result `json:"result"`
	Message string `json:"message,omitempty"`
}

// ErrAgentUnreachable wraps a failure to connect to the agent's socket:
// no agent serves on this node right now.
var ErrAgentUnreachable = errors.New("the node agent is not serving")

// ErrAgentTimeout wraps an agent that accepted the request but did not
// answer in time.
var ErrAgentTimeout = errors.New("the node agent did not answer in time")

// maxMessage bounds a request or response.
const maxMessage = 16 << 10
