package e2e

import (
	"context"
	"strings"

	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"

	"github.com/meshkeeper/meshkeeper/test/localmesh"
)

// The manager runs as its own ServiceAccount with config/rbac (see
// BeforeSuite); what that identity may do is what the API server says.
var _ = Describe("The manager's own ServiceAccount", func() {
	sa := "system:serviceaccount:" + localmesh.Namespace + ":" + localmesh.ServiceAccount
	canI := func(ctx context.Context, args ...string) string {
		GinkgoHelper()
		out, _, _ := kc.Kubectl(ctx, append([]string{"auth", "can-i", "--as", sa}, args...)...)
		return strings.TrimSpace(out)
	}

	It("may do what the components need, and no more", func(ctx SpecContext) {
		Expect(manager.Kubeconfig()).NotTo(Equal(kc.KubeconfigPath), "the manager does not run as the cluster admin")
		for _, allowed := range [][]string{
			{"patch", "deployments", "-n", "istio-system"},
			{"delete", "pods", "-n", "istio-system"},
			{"create", "pods", "-n", "istio-system"}, // ztunnel's surge pod in a node wave
			{"create", "secrets", "-n", localmesh.Namespace},
			{"create", "clusterroles"},
			{"bind", "clusterroles/istiod-1-28-2"},
			{"patch", "validatingwebhookconfigurations/meshkeeper-validating-webhook"},
			{"patch", "namespaces"},
			{"patch", "deployments", "-n", "default"}, // workload restarts of a mode switch
			{"list", "poddisruptionbudgets", "-n", "default"},
		} {
			Expect(canI(ctx, allowed...)).To(Equal("yes"), "%s may %v", sa, allowed)
		}
		for _, denied := range [][]string{
			{"get", "secrets", "-n", "default"},
			{"get", "secrets", "-n", "istio-system"},
			{"list", "secrets", "--all-namespaces"},
			{"delete", "pods", "-n", "default"},
			{"create", "pods", "-n", "default"},
			{"create", "deployments", "-n", "default"},
			{"delete", "deployments", "-n", "default"},
			{"update", "statefulsets", "-n", "default"},
			{"patch", "poddisruptionbudgets", "-n", "default"},
			{"create", "jobs", "-n", "istio-system"},
			{"bind", "clusterroles/cluster-admin"},
			{"escalate", "clusterroles/cluster-admin"},
			{"delete", "customresourcedefinitions"},
		} {
			Expect(canI(ctx, denied...)).To(Equal("no"), "%s may not %v", sa, denied)
		}
	})
})
