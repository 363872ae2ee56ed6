// Package restart executes plan.Next's workload restarts: what the planner
// lists in Decision.Restart (the namespaces) and Decision.RestartToken (the
// token) is carried out here, like `kubectl rollout restart` of every
// Deployment, StatefulSet and DaemonSet in those namespaces, paced within
// their PodDisruptionBudgets and a per-namespace budget. Observe reports
// whether a namespace has rolled out at a token, in the shape of
// plan.NamespaceFact (RolledOut, Waiting), so the controller can fill
// plan.Facts from it directly.
//
// What is stamped. The pod template annotation meshkeeper.dev/restartedAt,
// set to the token, with a server-side apply under the field manager
// FieldManager that holds only that one annotation. kubectl's own key
// (kubectl.kubernetes.io/restartedAt) is the one users recognise, but it is
// shared: `kubectl rollout restart`, and Argo CD's "restart" action, which
// writes the same key, would overwrite meshkeeper's token, Observe would
// then see the workload as not restarted at the token and restart it again,
// fighting the user's own restart. A key meshkeeper alone writes is never
// changed by anyone else, so the token on the template is the record of the
// restart: it survives a crash between the write and the next reconcile,
// and a second call with the same token finds every workload stamped and
// writes nothing. A user's restart with kubectl still works as ever (it
// adds its own key; meshkeeper's stays).
//
// GitOps. The apply sends nothing but the annotation, so the field manager
// owns nothing but it: Argo CD (client-side or server-side apply) and Flux
// keep every other field, re-applying their manifest neither conflicts with
// nor removes the annotation, and meshkeeper never reverts what they write.
//
// What is left alone, and reported: workloads annotated
// meshkeeper.dev/ignore: "true", paused Deployments (kubectl refuses to
// restart them too), and workloads controlled by another object (an
// ownerReference with controller: true, such as the waypoint Deployments
// istiod makes for a Gateway): their owner rewrites their template, and
// stamping it would make the two fight. Skipped workloads do not hold a
// namespace back in Observe.
package restart

import (
	"context"
	"errors"
	"fmt"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime"
	appsv1ac "k8s.io/client-go/applyconfigurations/apps/v1"
	corev1ac "k8s.io/client-go/applyconfigurations/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log"
)

const (
	// Annotation is the pod template annotation Restart stamps with the token.
	Annotation = "meshkeeper.dev/restartedAt"
	// AnnotationIgnore on a workload keeps meshkeeper from restarting it
	// (the project's one opt-out; its value must be "true").
	AnnotationIgnore = "meshkeeper.dev/ignore"
	// FieldManager is the server-side apply field manager of the stamp.
	FieldManager = "meshkeeper-restart"
)

// Item is one workload ("deployment/cart") and why it is listed.
type Item struct {
	Workload string
	Reason   string
}

func (i Item) String() string {
	if i.Reason == "" {
		return i.Workload
	}
	return i.Workload + " " + i.Reason
}

// Result is what one Restart call did in a namespace.
type Result struct {
	// Restarted are the workloads stamped with the token by this call.
	Restarted []string
	// AtToken were stamped before (by an earlier call) and are left as they are.
	AtToken []string
	// Waiting are not restarted yet, with why: a PodDisruptionBudget that
	// allows no disruption, the workload not rolled out before its restart,
	// or no free slot within the budget.
	Waiting []Item
	// Skipped are never restarted: ignored, paused, or controlled by another object.
	Skipped []Item
}

// Message is the Waiting list in the NamespaceFact.Waiting shape ("" when
// nothing waits).
func (r Result) Message() string {
	s := make([]string, len(r.Waiting))
	for i, w := range r.Waiting {
		s[i] = w.String()
	}
	return joinShort(s)
}

// Restart restarts the workloads of namespace ns that are not yet stamped
// with token, at most budget of them in flight at a time (stamped and not
// yet rolled out, counting those of earlier calls), and none whose pods a
// PodDisruptionBudget allowing no disruption covers, or that is not rolled
// out before its restart. Call it again (each reconcile) until Observe says
// the namespace rolled out: every call starts what may start now.
func Restart(ctx context.Context, c client.Client, ns, token string, budget int) (Result, error) {
	var res Result
	if token == "" {
		return res, errors.New("restart: empty token: the token is Decision.RestartToken and must be set")
	}
	if budget < 1 {
		return res, fmt.Errorf("restart: budget %d: at least one workload must be allowed to restart at a time", budget)
	}
	ws, pdbs, err := survey(ctx, c, ns)
	if err != nil {
		return res, err
	}
	p := newPacer(pdbs)
	inFlight := 0
	var todo []*workload
	for _, w := range ws {
		switch {
		case w.skip != "":
			res.Skipped = append(res.Skipped, Item{w.id(), w.skip})
		case w.stamp() == token:
			res.AtToken = append(res.AtToken, w.id())
			if ok, _ := w.rolledOut(); !ok {
				inFlight++
				p.take(w)
			}
		default:
			todo = append(todo, w)
		}
	}
	logger := log.FromContext(ctx)
	for _, w := range todo {
		if why := p.hold(w); why != "" {
			res.Waiting = append(res.Waiting, Item{w.id(), "not restarted: " + why})
			continue
		}
		if inFlight >= budget {
			res.Waiting = append(res.Waiting, Item{w.id(), fmt.Sprintf("not restarted: waiting for a restart slot (%d at a time)", budget)})
			continue
		}
		done, err := stampJudged(ctx, c, w, token, p, &res)
		if err != nil {
			return res, fmt.Errorf("restart %s in namespace %s: %w", w.id(), ns, err)
		}
		if done {
			logger.Info("Restarted workload", "namespace", ns, "workload", w.id(), "token", token)
			res.Restarted = append(res.Restarted, w.id())
			inFlight++
			p.take(w)
		}
	}
	return res, nil
}

// stampJudged stamps w, which was judged free to restart. The stamp is
// conditional on the resourceVersion that judgement read; when the
// workload changed since (its status, or paused, ignored, stamped by
// another reconcile), it is read and judged again, a few times at most;
// what it then is goes to res. done: it was stamped now.
func stampJudged(ctx context.Context, c client.Client, w *workload, token string, p *pacer, res *Result) (done bool, err error) {
	for attempt := 1; ; attempt++ {
		err := stampOne(ctx, c, w, token)
		switch {
		case err == nil:
			return true, nil
		case !apierrors.IsConflict(err) && !apierrors.IsNotFound(err):
			return false, err
		case attempt == 3:
			res.Waiting = append(res.Waiting, Item{w.id(), "not restarted: changing while being restarted, looked at again next time"})
			return false, nil
		}
		fresh := w.obj.DeepCopyObject().(client.Object)
		if err := c.Get(ctx, client.ObjectKeyFromObject(w.obj), fresh); err != nil {
			if apierrors.IsNotFound(err) {
				return false, nil // deleted: nothing to restart
			}
			return false, err
		}
		*w = *newWorkload(w.kind, fresh)
		switch {
		case w.skip != "":
			res.Skipped = append(res.Skipped, Item{w.id(), w.skip})
			return false, nil
		case w.stamp() == token:
			res.AtToken = append(res.AtToken, w.id())
			return false, nil
		}
		if why := p.hold(w); why != "" {
			res.Waiting = append(res.Waiting, Item{w.id(), "not restarted: " + why})
			return false, nil
		}
	}
}

// stampOne applies the annotation, and nothing else, to w's pod template.
// The resourceVersion makes it a precondition: if the workload changed
// since it was judged (paused, ignored, deleted), the apply is refused.
// Force: the key is meshkeeper's alone, so taking it back is right.
func stampOne(ctx context.Context, c client.Client, w *workload, token string) error {
	tmpl := corev1ac.PodTemplateSpec().WithAnnotations(map[string]string{Annotation: token})
	name, ns, rv := w.obj.GetName(), w.obj.GetNamespace(), w.obj.GetResourceVersion()
	var ac runtime.ApplyConfiguration
	switch w.obj.(type) {
	case *appsv1.Deployment:
		ac = appsv1ac.Deployment(name, ns).WithResourceVersion(rv).WithSpec(appsv1ac.DeploymentSpec().WithTemplate(tmpl))
	case *appsv1.StatefulSet:
		ac = appsv1ac.StatefulSet(name, ns).WithResourceVersion(rv).WithSpec(appsv1ac.StatefulSetSpec().WithTemplate(tmpl))
	case *appsv1.DaemonSet:
		ac = appsv1ac.DaemonSet(name, ns).WithResourceVersion(rv).WithSpec(appsv1ac.DaemonSetSpec().WithTemplate(tmpl))
	default:
		return fmt.Errorf("unsupported workload %T", w.obj)
	}
	return c.Apply(ctx, ac, client.FieldOwner(FieldManager), client.ForceOwnership)
}

// Observe says whether every workload of namespace ns (but the skipped
// ones) runs its pod template stamped with token, rolled out and ready; if
// not, waiting names what is not, e.g. "deployment/cart 1/3 ready" or
// "statefulset/db not restarted: PodDisruptionBudget db allows 0
// disruptions". A namespace without workloads has rolled out.
func Observe(ctx context.Context, c client.Client, ns, token string) (rolledOut bool, waiting string, err error) {
	if token == "" {
		return false, "", errors.New("restart: observe with an empty token: there is no restart to observe (Memory.Restart is empty)")
	}
	ws, pdbs, err := survey(ctx, c, ns)
	if err != nil {
		return false, "", err
	}
	p := newPacer(pdbs)
	for _, w := range ws {
		if w.skip == "" && w.stamp() == token {
			if ok, _ := w.rolledOut(); !ok {
				p.take(w)
			}
		}
	}
	var out []string
	for _, w := range ws {
		switch {
		case w.skip != "":
		case w.stamp() == token:
			if ok, why := w.rolledOut(); !ok {
				out = append(out, w.id()+" "+why)
			}
		default:
			if why := p.hold(w); why != "" {
				out = append(out, w.id()+" not restarted: "+why)
			} else {
				out = append(out, w.id()+" not restarted yet")
			}
		}
	}
	return len(out) == 0, joinShort(out), nil
}

// joinShort joins up to three entries, then says how many more: the
// message lands in status, whose fields are bounded.
func joinShort(s []string) string {
	const show = 3
	if len(s) <= show {
		return strings.Join(s, ", ")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(s[:show], ", "), len(s)-show)
}
