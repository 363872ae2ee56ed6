package controller

// Permissions the manager needs to install the mesh components through Helm,
// and no more: test/rbac renders every bundle's charts and fails when a rule
// below grants a verb on a kind no chart renders (outside the manager's own
// short list), when a rendered kind is not granted, or when the names below
// are not exactly the components' roles.
//
// Namespaced objects live only in the components' namespace (istio-system):
// a Role there, not a ClusterRole. The manager's cache is limited to that
// namespace for those kinds (CacheOptions). Helm's release Secrets, the
// webhook certificate and the leader lease are in meshkeeper-system (Role in
// mesh_controller.go); no Secret anywhere else is readable but the SPIRE
// relay's spire-relay-tls in the components' namespace, by name
// (mesh_spire_relay.go).
//
// Cluster-scoped kinds the charts render: CRDs (never deleted: the crds
// release keeps them), ClusterRoles and ClusterRoleBindings, istiod's
// Mutating- (sidecar injection) and ValidatingWebhookConfigurations
// (config validation).
// +kubebuilder:rbac:groups=apiextensions.k8s.io,resources=customresourcedefinitions,verbs=get;list;watch;create;update;patch
// +kubebuilder:rbac:groups=rbac.authorization.k8s.io,resources=clusterroles;clusterrolebindings,verbs=get;list;watch;create;update;patch;delete
// +kubebuilder:rbac:groups=admissionregistration.k8s.io,resources=mutatingwebhookconfigurations;validatingwebhookconfigurations,verbs=get;list;watch;create;update;patch;delete
//
// `bind` and `escalate` let the manager grant the components' permissions
// without holding them, for exactly the components' roles (a new bundle
// whose charts name another role makes test/rbac fail until it is listed).
// +kubebuilder:rbac:groups=rbac.authorization.k8s.io,resources=clusterroles,verbs=bind;escalate,resourceNames=istio-cni;istiod-1-26-4;istiod-1-26-4-gateway-controller;istiod-1-27-2;istiod-1-27-2-gateway-controller;istiod-1-27-3;istiod-1-27-3-gateway-controller;istiod-1-28-2;istiod-1-28-2-gateway-controller;meshkeeper-node-agent;meshkeeper-spire-agent;meshkeeper-spire-server
// +kubebuilder:rbac:groups=rbac.authorization.k8s.io,namespace=istio-system,resources=roles,verbs=bind;escalate,resourceNames=istiod-1-26-4;istiod-1-27-2;istiod-1-27-3;istiod-1-28-2;spire-server
//
// Namespaced kinds the charts render, in the components' namespace only.
// +kubebuilder:rbac:groups="",namespace=istio-system,resources=configmaps;services;serviceaccounts,verbs=get;list;watch;create;update;patch;delete
// +kubebuilder:rbac:groups=apps,namespace=istio-system,resources=deployments;daemonsets;statefulsets,verbs=get;list;watch;create;update;patch;delete
// +kubebuilder:rbac:groups=policy,namespace=istio-system,resources=poddisruptionbudgets,verbs=get;list;watch;create;update;patch;delete
// +kubebuilder:rbac:groups=rbac.authorization.k8s.io,namespace=istio-system,resources=roles;rolebindings,verbs=get;list;watch;create;update;patch;delete
//
// Node waves read the node components' ControllerRevisions and replace their
// pods node by node (mesh_nodewaves.go), in the components' namespace;
// ztunnel's make-before-break (mesh_nodesurge.go) starts a pod of its
// DaemonSet's template beside the old one first.
// +kubebuilder:rbac:groups="",namespace=istio-system,resources=pods,verbs=get;list;watch;create;delete
// +kubebuilder:rbac:groups=apps,namespace=istio-system,resources=controllerrevisions,verbs=get;list;watch
//
// A mode switch restarts the workloads of each wave's namespaces, as
// `kubectl rollout restart` does, paced by their PodDisruptionBudgets
// (internal/restart, mesh_engine.go), in whichever namespace the Mesh
// selects. Only the pod template's meshkeeper.dev/restartedAt annotation is
// written (server-side apply owning that one field); read uncached, so no
// informer holds every workload of the cluster.
// +kubebuilder:rbac:groups=apps,resources=deployments;daemonsets;statefulsets,verbs=get;list;patch
// +kubebuilder:rbac:groups=policy,resources=poddisruptionbudgets,verbs=get;list
//
// The components' namespace is created when missing (internal/helm).
// +kubebuilder:rbac:groups="",resources=namespaces,verbs=create
