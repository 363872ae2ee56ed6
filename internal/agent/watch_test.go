package agent

import (
	"testing"

	. "github.com/onsi/gomega"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
)

// TestPodWatcherTakesTheRevisionFromTheNamespace: the workload_revision
// label comes from the pod's namespace's istio.io/rev, the only label the
// watcher keeps of a namespace.
func TestPodWatcherTakesTheRevisionFromTheNamespace(t *testing.T) {
	g := NewWithT(t)
	slim, err := slimNamespace(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop", Labels: map[string]string{
		"istio.io/rev": "1-28-2", "istio.io/dataplane-mode": "ambient", "team": "a"}}})
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(slim.(*corev1.Namespace).Labels).To(Equal(map[string]string{"istio.io/rev": "1-28-2"}))

	w := &PodWatcher{namespaces: cache.NewSharedIndexInformer(&cache.ListWatch{}, &corev1.Namespace{}, 0, cache.Indexers{})}
	g.Expect(w.namespaces.GetStore().Add(slim)).To(Succeed())
	enrolled, rev := w.namespace("shop")
	g.Expect(enrolled).To(BeTrue())
	g.Expect(rev).To(Equal("1-28-2"))
	enrolled, rev = w.namespace("other")
	g.Expect(enrolled).To(BeFalse())
	g.Expect(rev).To(BeEmpty())
}
