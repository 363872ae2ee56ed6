{{- define "istiod.name" -}}istiod-{{ .Values.revision }}{{- end }}

{{- define "istiod.selectorLabels" -}}
app: istiod
istio.io/rev: {{ .Values.revision | quote }}
{{- end }}

{{- define "istiod.componentsNamespace" -}}{{ .Values.namespace | default .Release.Namespace }}{{- end }}

{{/* istiod.address: the xDS/CA endpoint proxies of this revision use. */}}
{{- define "istiod.address" -}}istiod-{{ .Values.revision }}.{{ .Release.Namespace }}.svc:15012{{- end }}

{{/* istiod.meshConfig: the mesh config of this revision. */}}
{{- define "istiod.meshConfig" -}}
{{- $base := dict
  "rootNamespace" .Release.Namespace
  "trustDomain" .Values.trustDomain
  "enablePrometheusMerge" true
  "accessLogFile" ""
  "defaultConfig" (dict
    "discoveryAddress" (include "istiod.address" .)
    "proxyMetadata" (dict))
}}
{{- toYaml (mergeOverwrite $base (deepCopy .Values.meshConfig)) }}
{{- end }}

{{/*
istiod.webhookClientConfig: how the API server reaches one of istiod's
webhooks; the argument is a dict of the root context (.root) and the path.
No caBundle: istiod patches in its own CA.
*/}}
{{- define "istiod.webhookClientConfig" -}}
{{- if .root.Values.webhooks.url -}}
url: {{ printf "%s%s" (trimSuffix "/" .root.Values.webhooks.url) .path | quote }}
{{- else -}}
service:
  name: {{ include "istiod.name" .root }}
  namespace: {{ .root.Release.Namespace }}
  path: {{ .path }}
  port: 443
{{- end }}
{{- end }}
