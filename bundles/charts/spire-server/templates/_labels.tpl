{{/*
meshkeeper.labels: the labels every object of this chart carries. The
component is the chart's name (one chart per meshkeeper component) and the
revision is the bundle's ("1-28-2"). internal/helm adds the same labels with a
post-renderer; rendering them here too keeps `helm template` output honest.
Note: Helm itself rewrites app.kubernetes.io/managed-by to "Helm" on the
top-level objects it applies; select meshkeeper's objects by
meshkeeper.dev/component instead.
*/}}
{{- define "meshkeeper.labels" -}}
app.kubernetes.io/managed-by: meshkeeper
app.kubernetes.io/part-of: meshkeeper
app.kubernetes.io/version: {{ .Values.version | quote }}
meshkeeper.dev/component: {{ .Chart.Name }}
meshkeeper.dev/revision: {{ .Values.revision | quote }}
{{- end }}

{{/*
meshkeeper.podLabels: labels for workload pod templates. Pods carry the
component (so drift, readiness and node-wave logic can find them) but not the
version, which would roll every pod on a label-only change.
*/}}
{{- define "meshkeeper.podLabels" -}}
app.kubernetes.io/part-of: meshkeeper
meshkeeper.dev/component: {{ .Chart.Name }}
meshkeeper.dev/revision: {{ .Values.revision | quote }}
{{- end }}
