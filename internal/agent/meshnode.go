package agent

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/util/retry"

	"github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// The node agent's RBAC: it reports its own node and reads pods and
// namespaces to know what to enroll. Nothing else.
// +kubebuilder:rbac:groups=meshkeeper.dev,resources=meshnodes,verbs=get;create
// +kubebuilder:rbac:groups=meshkeeper.dev,resources=meshnodes/status,verbs=update
// +kubebuilder:rbac:groups="",resources=pods;namespaces,verbs=list;watch
// +kubebuilder:rbac:groups="",resources=nodes,verbs=get

// MeshNodeStatus turns a preflight result (and the outcome of loading the
// datapath, when it was tried) into the node's MeshNode status.
func MeshNodeStatus(r Result, datapathErr error, agentVersion string, now time.Time) v1alpha1.MeshNodeStatus {
	s := v1alpha1.MeshNodeStatus{
		KernelRelease: r.KernelRelease,
		BTF:           r.BTF,
		CgroupV2:      r.CgroupV2,
		CgroupV2Path:  r.CgroupV2Path,
		BPFFS:         r.BPFFS,
		Features:      r.Features,
		Eligible:      r.Eligible,
		Reason:        r.Reason,
		AgentVersion:  agentVersion,
		ProbedAt:      &metav1.Time{Time: now},
	}
	switch {
	case !r.Eligible:
		// The operator picks iptables or blocked from the Mesh's kernelFallback.
	case datapathErr != nil:
		s.Eligible = false
		s.Reason = fmt.Sprintf("eBPF datapath failed to load: %v", datapathErr)
	default:
		s.Redirection = v1alpha1.NodeRedirectionEBPF
	}
	return s
}

// EnrolmentStatus is the MeshNode's enrolment report: the counts and the
// first MaxNotEnrolledPods of the waiting pods (longest waiting first, as
// Enroller.Enrolment returns them), with a count of the ones left out.
func EnrolmentStatus(wanted, enrolled int, waiting []PodWaiting, now time.Time) *v1alpha1.NodeEnrolment {
	st := &v1alpha1.NodeEnrolment{Wanted: int32(wanted), Enrolled: int32(enrolled), ObservedAt: &metav1.Time{Time: now}}
	for i, w := range waiting {
		if i == v1alpha1.MaxNotEnrolledPods {
			st.NotEnrolledOmitted = int32(len(waiting) - i)
			break
		}
		st.NotEnrolled = append(st.NotEnrolled, v1alpha1.PodNotEnrolled{
			Namespace: w.Pod.Namespace, Name: w.Pod.Name, Since: metav1.Time{Time: w.Since}, Reason: w.Reason,
		})
	}
	return st
}

// sameEnrolment is true when a and b report the same counts and pods (the
// time they were observed aside): the agent rewrites its MeshNode only when
// this changes.
func sameEnrolment(a, b *v1alpha1.NodeEnrolment) bool {
	if a == nil || b == nil {
		return a == b
	}
	if a.Wanted != b.Wanted || a.Enrolled != b.Enrolled || a.NotEnrolledOmitted != b.NotEnrolledOmitted || len(a.NotEnrolled) != len(b.NotEnrolled) {
		return false
	}
	for i := range a.NotEnrolled {
		x, y := a.NotEnrolled[i], b.NotEnrolled[i]
		if x.Namespace != y.Namespace || x.Name != y.Name || x.Reason != y.Reason || !x.Since.Equal(&y.Since) {
			return false
		}
	}
	return true
}

// WriteMeshNode creates the node's MeshNode when it is missing and writes
// its status (get, create, status update; retried on conflicts).
func WriteMeshNode(ctx context.Context, c rest.Interface, nodeName string, status v1alpha1.MeshNodeStatus) error {
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		mn := &v1alpha1.MeshNode{}
		err := c.Get().Resource("meshnodes").Name(nodeName).Do(ctx).Into(mn)
		if apierrors.IsNotFound(err) {
			mn = &v1alpha1.MeshNode{ObjectMeta: metav1.ObjectMeta{
				Name:   nodeName,
				Labels: map[string]string{"app.kubernetes.io/managed-by": "meshkeeper-agent"},
			}}
			err = c.Post().Resource("meshnodes").Body(mn).Do(ctx).Into(mn)
			if apierrors.IsAlreadyExists(err) {
				err = c.Get().Resource("meshnodes").Name(nodeName).Do(ctx).Into(mn)
			}
			if err != nil {
				return fmt.Errorf("create MeshNode %s: %w", nodeName, err)
			}
		} else if err != nil {
			return fmt.Errorf("get MeshNode %s: %w", nodeName, err)
		}
		mn.Status = status
		if err := c.Put().Resource("meshnodes").Name(nodeName).SubResource("status").Body(mn).Do(ctx).Into(mn); err != nil {
			return fmt.Errorf("update MeshNode %s status: %w", nodeName, err)
		}
		return nil
	})
}

// DetachOnExit decides, as the agent stops, whether the node's datapath goes
// with it. Normally it stays (a restart or an upgrade must not drop
// redirection). It goes when the node no longer carries
// meshkeeper.dev/redirection=ebpf: the operator moved the node to the
// iptables fallback, blocked it, or released it, and the DaemonSet is
// removing this agent for good. A node that cannot be read (API server down)
// keeps the datapath: wrongly detaching breaks redirection, wrongly keeping
// it is repaired by the next agent or the cleanup phase.
func DetachOnExit(node *corev1.Node, getErr error) (bool, string) {
	switch {
	case apierrors.IsNotFound(getErr):
		return true, "the node is gone"
	case getErr != nil:
		return false, fmt.Sprintf("cannot read the node (%v): keeping the datapath", getErr)
	}
	label, ok := node.Labels[v1alpha1.LabelRedirection]
	switch {
	case !ok:
		return true, "the node has no " + v1alpha1.LabelRedirection + " label any more"
	case label != string(v1alpha1.NodeRedirectionEBPF):
		return true, fmt.Sprintf("the node moved to %s=%s", v1alpha1.LabelRedirection, label)
	}
	return false, "the node still uses eBPF redirection: keeping the datapath for the next agent"
}

// GetNode reads a node through the agent's core client.
func GetNode(ctx context.Context, c rest.Interface, name string) (*corev1.Node, error) {
	n := &corev1.Node{}
	if err := c.Get().Resource("nodes").Name(name).Do(ctx).Into(n); err != nil {
		return nil, err
	}
	return n, nil
}
