//go:build linux

package istiod

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	"go.uber.org/zap/zapcore"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"

	"github.com/meshkeeper/meshkeeper/test/cluster"
)

// startCluster skips (or fails, under MESHKEEPER_REQUIRE_CLUSTER) without
// istiod or the cluster binaries, and starts the local cluster every test
// here runs istiod against: meshkeeper's CRDs and one kwok node. It stops
// with the test; cancel ends ctx (a manager run on it stops) before that.
func startCluster(t *testing.T) (*WithT, context.Context, context.CancelFunc, *cluster.Cluster) {
	t.Helper()
	SkipIfUnavailable(t)
	cluster.SkipIfUnavailable(t)
	ctrl.SetLogger(zap.New(zap.UseDevMode(true), zap.Level(zapcore.ErrorLevel)))
	g := NewWithT(t)
	g.SetDefaultEventuallyTimeout(2 * time.Minute)
	g.SetDefaultEventuallyPollingInterval(250 * time.Millisecond)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	kc, err := cluster.Start(ctx, cluster.Options{
		CRDDirectoryPaths: []string{filepath.Join("..", "..", "config", "crd", "bases")},
		Nodes:             []cluster.Node{{Name: "node-a", KernelVersion: "6.1.0-28-amd64"}},
	})
	g.Expect(err).NotTo(HaveOccurred())
	t.Cleanup(func() { _ = kc.Stop() })
	return g, ctx, cancel, kc
}
