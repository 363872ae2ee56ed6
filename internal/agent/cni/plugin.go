package cni

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"
)

// Pod is the pod a CNI call is for (K8S_POD_* of CNI_ARGS).
type Pod struct {
	Namespace, Name, UID string
}

func (p Pod) String() string { return p.Namespace + "/" + p.Name }

// TimeoutOf is the conf's timeout, DefaultTimeout when unset.
func (c PluginConf) TimeoutOf() (time.Duration, error) {
	if c.Timeout == "" {
		return DefaultTimeout, nil
	}
	d, err := time.ParseDuration(c.Timeout)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("meshkeeper-cni conf: timeout %q: want a positive duration such as \"5s\"", c.Timeout)
	}
	return d, nil
}

// PluginAdd is the plugin's ADD: it asks the agent to enrol the pod's
// network namespace and returns nil once it is enrolled or the agent says
// the pod is not meshed. It fails closed: when the agent is not serving or
// does not answer within the conf's timeout, it returns an error (the ADD
// fails, the kubelet retries the sandbox), except for pods of excluded
// namespaces, which pass through without asking.
func PluginAdd(ctx context.Context, c PluginConf, pod Pod, containerID, netnsPath string) (Response, error) {
	if pod.Name == "" || netnsPath == "" {
		return Response{Result: ResultSkipped, Message: "not a Kubernetes pod with its own network namespace"}, nil
	}
	if Excluded(pod.Namespace, c.ExcludeNamespaces) {
		return Response{Result: ResultSkipped, Message: "namespace " + pod.Namespace + " is excluded"}, nil
	}
	timeout, err := c.TimeoutOf()
	if err != nil {
		return Response{}, err
	}
	socket := c.Socket
	if socket == "" {
		socket = DefaultSocket
	}
	ns, err := os.Open(netnsPath)
	if err != nil {
		return Response{}, fmt.Errorf("meshkeeper-cni: open the network namespace of pod %s: %w", pod, err)
	}
	defer ns.Close()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req := Request{
		Command: CommandAdd, Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID,
		ContainerID: containerID, Netns: netnsPath,
	}
	resp, err := Call(ctx, socket, req, ns)
	// An agent that is restarting listens again within seconds: keep
	// trying until the timeout rather than fail the sandbox at once.
	for errors.Is(err, ErrAgentUnreachable) && pause(ctx, reconnectInterval) {
		resp, err = Call(ctx, socket, req, ns)
	}
	switch {
	case errors.Is(err, ErrAgentUnreachable):
		return Response{}, wrapped{err, fmt.Sprintf("meshkeeper-cni: pod %s not started: the meshkeeper node agent is not serving on this node (%s), so it cannot tell whether the pod is meshed, and a meshed pod must never start unmeshed; the kubelet retries. Bring the node agent back (kubectl get pods -A -l app=meshkeeper-node-agent -o wide), or delete the Mesh, which removes this plugin", pod, cause(err, ErrAgentUnreachable))}
	case errors.Is(err, ErrAgentTimeout):
		return Response{}, wrapped{err, fmt.Sprintf("meshkeeper-cni: pod %s not started: the meshkeeper node agent did not enrol it within %s (%s); the kubelet retries. See the node agent's log on this node", pod, timeout, cause(err, ErrAgentTimeout))}
	case err != nil:
		return Response{}, fmt.Errorf("meshkeeper-cni: pod %s not started: %w", pod, err)
	}
	if resp.Result == ResultError {
		return resp, fmt.Errorf("meshkeeper-cni: pod %s not started: the node agent could not enrol it: %s", pod, resp.Message)
	}
	return resp, nil
}

// PluginDel tells the agent a sandbox's network is torn down. It never
// fails: a teardown must always succeed, and a pod the agent no longer
// knows is unenrolled when the agent sees it deleted.
func PluginDel(ctx context.Context, c PluginConf, pod Pod, containerID, netnsPath string) {
	if pod.Name == "" || Excluded(pod.Namespace, c.ExcludeNamespaces) {
		return
	}
	socket := c.Socket
	if socket == "" {
		socket = DefaultSocket
	}
	var ns *os.File
	if netnsPath != "" {
		if f, err := os.Open(netnsPath); err == nil {
			ns = f
			defer f.Close()
		}
	}
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	_, _ = Call(ctx, socket, Request{Command: CommandDel, Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID, ContainerID: containerID, Netns: netnsPath}, ns)
}

// PluginCheck asks the agent whether a meshed pod's namespace is still
// enrolled; an unreachable agent is an error for pods it would mesh.
func PluginCheck(ctx context.Context, c PluginConf, pod Pod, containerID, netnsPath string) error {
	if pod.Name == "" || netnsPath == "" || Excluded(pod.Namespace, c.ExcludeNamespaces) {
		return nil
	}
	timeout, err := c.TimeoutOf()
	if err != nil {
		return err
	}
	socket := c.Socket
	if socket == "" {
		socket = DefaultSocket
	}
	ns, err := os.Open(netnsPath)
	if err != nil {
		return fmt.Errorf("meshkeeper-cni: open the network namespace of pod %s: %w", pod, err)
	}
	defer ns.Close()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	resp, err := Call(ctx, socket, Request{Command: CommandCheck, Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID, ContainerID: containerID, Netns: netnsPath}, ns)
	if err != nil {
		return fmt.Errorf("meshkeeper-cni: check pod %s: %w", pod, err)
	}
	if resp.Result == ResultError {
		return fmt.Errorf("meshkeeper-cni: check pod %s: %s", pod, resp.Message)
	}
	return nil
}

// wrapped is an error with its own message that still matches err.
type wrapped struct {
	err error
	msg string
}

func (w wrapped) Error() string { return w.msg }
func (w wrapped) Unwrap() error { return w.err }

// cause is err's message without the sentinel's prefix.
func cause(err, sentinel error) string {
	return strings.TrimPrefix(err.Error(), sentinel.Error()+": ")
}

// reconnectInterval is how often an ADD tries the agent's socket again
// while no agent listens.
const reconnectInterval = 100 * time.Millisecond

// pause waits d unless ctx ends within it (then it returns false at once,
// so the last attempt's error stands).
func pause(ctx context.Context, d time.Duration) bool {
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) < 2*d {
		return false
	}
	select {
	case <-ctx.Done():
		return false
	case <-time.After(d):
		return true
	}
}
