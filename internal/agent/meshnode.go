package agent

import (
	"context"
	"fmt"
	"time"

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
