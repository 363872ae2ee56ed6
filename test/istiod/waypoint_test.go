//go:build linux

package istiod

import (
	"context"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
	"github.com/meshkeeper/meshkeeper/internal/controller"
	"github.com/meshkeeper/meshkeeper/internal/helm"
)

// TestWaypointWithARealIstiod: meshkeeper installs the 1.28.2 bundle on a
// local cluster (kwok nodes), a real istiod of that revision runs against
// it, and what istiod does with meshkeeper's waypoint Gateway is what a user
// would see: the waypoint Deployment and Service, Programmed, and only then
// the namespace's use-waypoint label; a removed entry takes all of it away;
// a Gateway meshkeeper did not write is left alone and reported.
func TestWaypointWithARealIstiod(t *testing.T) {
	g, ctx, cancel, kc := startCluster(t)
	k8s := kc.Client
	g.Expect(k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "meshkeeper-system"}})).To(Succeed())
	hc, err := helm.New(kc.Config, "meshkeeper-system", ctrl.Log.WithName("helm"))
	g.Expect(err).NotTo(HaveOccurred())
	mgr, err := ctrl.NewManager(kc.Config, ctrl.Options{Scheme: kc.Scheme, Metrics: metricsserver.Options{BindAddress: "0"},
		// Each test of the package runs its own manager in this process.
		Controller: config.Controller{SkipNameValidation: new(true)}})
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect((&controller.MeshReconciler{
		Client: mgr.GetClient(), Helm: hc, Catalog: bundle.Default(), ComponentsNamespace: "istio-system",
	}).SetupWithManager(mgr)).To(Succeed())
	mgrDone := make(chan struct{})
	go func() { _ = mgr.Start(ctx); close(mgrDone) }()
	t.Cleanup(func() { cancel(); <-mgrDone })

	g.Expect(k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop", Labels: map[string]string{"mesh": "on"}}})).To(Succeed())
	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.28.2",
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"mesh": "on"}}},
			Waypoints:  []meshv1.WaypointSpec{{Namespace: "shop", Name: "waypoint", For: meshv1.WaypointForService}},
		},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())

	// meshkeeper's Gateway comes first; istiod of its revision once the
	// istiod release (its ConfigMaps, the waypoint template) is installed.
	gw := &gatewayv1.Gateway{}
	g.Eventually(func() error {
		return k8s.Get(ctx, client.ObjectKey{Namespace: "shop", Name: "waypoint"}, gw)
	}).Should(Succeed())
	g.Expect(gw.Labels).To(HaveKeyWithValue(meshv1.LabelRevision, "1-28-2"))
	g.Consistently(nsLabels).WithArguments(ctx, k8s, "shop").WithTimeout(2*time.Second).
		ShouldNot(HaveKey(meshv1.LabelUseWaypoint), "not before istiod programmed the Gateway")
	_, err = Start(ctx, t, kc, Options{Revision: "1-28-2"})
	g.Expect(err).NotTo(HaveOccurred())

	t.Run("istiod deploys the waypoint and programs meshkeeper's Gateway; then the namespace uses it", func(t *testing.T) {
		g := NewWithT(t)
		g.SetDefaultEventuallyTimeout(2 * time.Minute)
		g.Eventually(func() error {
			return k8s.Get(ctx, client.ObjectKey{Namespace: "shop", Name: "waypoint"}, &appsv1.Deployment{})
		}).Should(Succeed(), "istiod creates the waypoint Deployment")
		svc := &corev1.Service{}
		g.Eventually(func() error { return k8s.Get(ctx, client.ObjectKey{Namespace: "shop", Name: "waypoint"}, svc) }).Should(Succeed())
		var ports []int32
		for _, p := range svc.Spec.Ports {
			ports = append(ports, p.Port)
		}
		g.Expect(ports).To(ContainElement(int32(15008)), "the waypoint Service serves HBONE")
		g.Eventually(func() bool {
			_ = k8s.Get(ctx, client.ObjectKey{Namespace: "shop", Name: "waypoint"}, gw)
			return meta.IsStatusConditionTrue(gw.Status.Conditions, "Programmed")
		}).Should(BeTrue(), "istiod sets Programmed")
		g.Eventually(nsLabels).WithArguments(ctx, k8s, "shop").Should(HaveKeyWithValue(meshv1.LabelUseWaypoint, "waypoint"))
		g.Eventually(func() *meshv1.WaypointsStatus { return meshStatus(ctx, k8s).Waypoints }).Should(And(
			Not(BeNil()), HaveField("Ready", BeEquivalentTo(1)),
			HaveField("Items", ConsistOf(And(HaveField("Programmed", true), HaveField("InUse", true), HaveField("Revision", "1-28-2"))))))
	})

	t.Run("a Gateway meshkeeper did not write is untouched and reported", func(t *testing.T) {
		g := NewWithT(t)
		g.SetDefaultEventuallyTimeout(time.Minute)
		theirs := &gatewayv1.Gateway{
			ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "theirs"},
			Spec: gatewayv1.GatewaySpec{GatewayClassName: "istio-waypoint", Listeners: []gatewayv1.Listener{
				{Name: "mesh", Port: 15008, Protocol: "HBONE"}}},
		}
		g.Expect(k8s.Create(ctx, theirs)).To(Succeed())
		updateSpec(g, ctx, k8s, func(m *meshv1.Mesh) {
			m.Spec.Waypoints = append(m.Spec.Waypoints, meshv1.WaypointSpec{Namespace: "shop", Name: "theirs"})
		})
		g.Eventually(func() []string {
			if w := meshStatus(ctx, k8s).Waypoints; w != nil {
				return w.Conflicts
			}
			return nil
		}).Should(ContainElement(ContainSubstring("Gateway shop/theirs: not created by meshkeeper")))
		got := &gatewayv1.Gateway{}
		g.Expect(k8s.Get(ctx, client.ObjectKeyFromObject(theirs), got)).To(Succeed())
		g.Expect(got.Labels).NotTo(HaveKey(meshv1.LabelComponent))
		g.Expect(meta.FindStatusCondition(meshStatus(ctx, k8s).Conditions, meshv1.ConditionDegraded)).To(
			HaveField("Reason", meshv1.ReasonWaypointConflict))
		updateSpec(g, ctx, k8s, func(m *meshv1.Mesh) { m.Spec.Waypoints = m.Spec.Waypoints[:1] })
	})

	t.Run("removing the entry removes the label, the Gateway and so istiod's waypoint", func(t *testing.T) {
		g := NewWithT(t)
		g.SetDefaultEventuallyTimeout(2 * time.Minute)
		updateSpec(g, ctx, k8s, func(m *meshv1.Mesh) { m.Spec.Waypoints = nil })
		g.Eventually(nsLabels).WithArguments(ctx, k8s, "shop").ShouldNot(HaveKey(meshv1.LabelUseWaypoint))
		g.Eventually(func() bool {
			return apierrors.IsNotFound(k8s.Get(ctx, client.ObjectKey{Namespace: "shop", Name: "waypoint"}, &gatewayv1.Gateway{}))
		}).Should(BeTrue())
		g.Eventually(func() bool {
			return apierrors.IsNotFound(k8s.Get(ctx, client.ObjectKey{Namespace: "shop", Name: "waypoint"}, &appsv1.Deployment{}))
		}).Should(BeTrue(), "the waypoint Deployment is owned by the Gateway and goes with it")
		g.Expect(k8s.Get(ctx, client.ObjectKey{Namespace: "shop", Name: "theirs"}, &gatewayv1.Gateway{})).To(Succeed())
	})
}

func nsLabels(ctx context.Context, c client.Client, name string) map[string]string {
	ns := &corev1.Namespace{}
	if err := c.Get(ctx, client.ObjectKey{Name: name}, ns); err != nil {
		return nil
	}
	return ns.Labels
}

func meshStatus(ctx context.Context, c client.Client) meshv1.MeshStatus {
	m := &meshv1.Mesh{}
	_ = c.Get(ctx, client.ObjectKey{Name: "default"}, m)
	return m.Status
}

func updateSpec(g Gomega, ctx context.Context, c client.Client, mutate func(*meshv1.Mesh)) {
	g.Eventually(func() error {
		m := &meshv1.Mesh{}
		if err := c.Get(ctx, client.ObjectKey{Name: "default"}, m); err != nil {
			return err
		}
		mutate(m)
		return c.Update(ctx, m)
	}).Should(Succeed())
}
