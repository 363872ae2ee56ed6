package agent

import (
	"context"
	"fmt"
	"sync"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"

	"github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// DefaultNamespaceSelector selects the namespaces whose pods are enrolled:
// the label the operator puts on namespaces in an ambient mesh.
const DefaultNamespaceSelector = "istio.io/dataplane-mode=ambient"

// optOutLabel on a pod keeps it out of the mesh, as in Istio.
const optOutLabel = "istio.io/dataplane-mode"

// WantPod decides whether a pod on this node is to be redirected: it runs in
// its own network namespace, in an enrolled namespace, has not finished and
// has not opted out. A terminating pod stays enrolled until it is gone: its
// containers still run during the grace period.
func WantPod(pod *corev1.Pod, namespaceEnrolled bool) bool {
	switch {
	case !namespaceEnrolled,
		pod.Spec.HostNetwork,
		pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed,
		pod.Labels[optOutLabel] == "none":
		return false
	}
	return true
}

// PodWatcher keeps the enroller's wanted pods equal to the pods on one node
// that WantPod accepts, from pod and namespace informers.
type PodWatcher struct {
	Client            rest.Interface // core/v1, from NewKubeClients
	NodeName          string
	NamespaceSelector string
	Enroller          *Enroller
	Log               logr.Logger
	// Synced, when set, is called once every existing pod was handled.
	Synced func()

	pods       cache.SharedIndexInformer
	namespaces cache.SharedIndexInformer
	syncOnce   sync.Once
	synced     chan struct{} // closed once both caches are complete
}

func (w *PodWatcher) syncedCh() chan struct{} {
	w.syncOnce.Do(func() { w.synced = make(chan struct{}) })
	return w.synced
}

// Run watches until ctx ends. Once the informers have synced and every
// existing pod was handled, enrolments no pod claims are removed.
func (w *PodWatcher) Run(ctx context.Context) error {
	sel, err := labels.Parse(w.NamespaceSelector)
	if err != nil {
		return fmt.Errorf("namespace selector %q: %w", w.NamespaceSelector, err)
	}
	w.pods = cache.NewSharedIndexInformer(
		cache.NewFilteredListWatchFromClient(w.Client, "pods", metav1.NamespaceAll, func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", w.NodeName).String()
		}), &corev1.Pod{}, 0, cache.Indexers{})
	w.namespaces = cache.NewSharedIndexInformer(
		cache.NewFilteredListWatchFromClient(w.Client, "namespaces", metav1.NamespaceAll, func(o *metav1.ListOptions) {
			o.LabelSelector = sel.String()
		}), &corev1.Namespace{}, 0, cache.Indexers{})
	// Keep only what WantPod reads: a node's pods then cost a few hundred
	// bytes each in the agent's memory.
	if err := w.pods.SetTransform(slimPod); err != nil {
		return err
	}
	if err := w.namespaces.SetTransform(slimNamespace); err != nil {
		return err
	}
	go w.pods.RunWithContext(ctx)
	go w.namespaces.RunWithContext(ctx)
	if !cache.WaitForCacheSync(ctx.Done(), w.pods.HasSynced, w.namespaces.HasSynced) {
		return ctx.Err()
	}
	close(w.syncedCh())
	// Handlers go on after both caches are complete, so a pod's namespace is
	// always known when the pod is handled; existing objects are replayed.
	podReg, err := w.pods.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { w.syncPod(obj) },
		UpdateFunc: func(_, obj any) { w.syncPod(obj) },
		DeleteFunc: func(obj any) { w.forgetPod(obj) },
	})
	if err != nil {
		return err
	}
	nsReg, err := w.namespaces.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { w.syncNamespace(obj) },
		UpdateFunc: func(_, obj any) { w.syncNamespace(obj) },
		DeleteFunc: func(obj any) { w.syncNamespace(obj) },
	})
	if err != nil {
		return err
	}
	if !cache.WaitForCacheSync(ctx.Done(), podReg.HasSynced, nsReg.HasSynced) {
		return ctx.Err()
	}
	w.Enroller.Reconcile()
	if w.Synced != nil {
		w.Synced()
	}
	w.Log.Info("Watching pods", "node", w.NodeName, "namespaceSelector", sel.String())
	<-ctx.Done()
	return nil
}

// namespace says whether a namespace is enrolled and which revision it
// points at (istio.io/rev).
func (w *PodWatcher) namespace(name string) (enrolled bool, revision string) {
	obj, exists, _ := w.namespaces.GetStore().GetByKey(name)
	if ns, ok := obj.(*corev1.Namespace); ok && exists {
		return true, ns.Labels[v1alpha1.LabelRevision]
	}
	return exists, ""
}

func (w *PodWatcher) syncPod(obj any) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	enrolled, revision := w.namespace(pod.Namespace)
	ref := PodRef{Namespace: pod.Namespace, Name: pod.Name, UID: string(pod.UID), Revision: revision, ServiceAccount: pod.Spec.ServiceAccountName}
	if WantPod(pod, enrolled) {
		w.Enroller.Want(ref)
	} else {
		w.Enroller.Forget(ref.UID)
	}
}

func (w *PodWatcher) forgetPod(obj any) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	if pod, ok := obj.(*corev1.Pod); ok {
		// Deleted from the API server is not stopped: its containers may
		// still run (a zero grace period). The enroller keeps it until
		// its sandbox is gone.
		w.Enroller.Gone(string(pod.UID))
	}
}

// syncNamespace re-decides every pod of a namespace that joined, left or
// moved to another revision.
func (w *PodWatcher) syncNamespace(obj any) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	ns, ok := obj.(*corev1.Namespace)
	if !ok {
		return
	}
	for _, o := range w.pods.GetStore().List() {
		if pod, ok := o.(*corev1.Pod); ok && pod.Namespace == ns.Name {
			w.syncPod(pod)
		}
	}
}

func slimPod(obj any) (any, error) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil
	}
	slim := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: pod.Name, Namespace: pod.Namespace, UID: pod.UID,
			ResourceVersion: pod.ResourceVersion, DeletionTimestamp: pod.DeletionTimestamp,
		},
		Spec:   corev1.PodSpec{NodeName: pod.Spec.NodeName, HostNetwork: pod.Spec.HostNetwork, ServiceAccountName: pod.Spec.ServiceAccountName},
		Status: corev1.PodStatus{Phase: pod.Status.Phase},
	}
	if v, ok := pod.Labels[optOutLabel]; ok {
		slim.Labels = map[string]string{optOutLabel: v}
	}
	return slim, nil
}

func slimNamespace(obj any) (any, error) {
	ns, ok := obj.(*corev1.Namespace)
	if !ok {
		return obj, nil
	}
	slim := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns.Name, UID: ns.UID, ResourceVersion: ns.ResourceVersion}}
	if rev, ok := ns.Labels[v1alpha1.LabelRevision]; ok {
		slim.Labels = map[string]string{v1alpha1.LabelRevision: rev}
	}
	return slim, nil
}
