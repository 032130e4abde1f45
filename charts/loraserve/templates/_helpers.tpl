{{- define "loraserve.tag" -}}{{ .Values.image.tag | default .Chart.AppVersion }}{{- end -}}
{{- define "loraserve.labels" -}}
app.kubernetes.io/part-of: loraserve
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
{{- define "loraserve.podSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  seccompProfile: {type: RuntimeDefault}
{{- end -}}
{{- define "loraserve.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  runAsNonRoot: true
  capabilities: {drop: [ALL]}
  seccompProfile: {type: RuntimeDefault}
{{- end -}}
{{- define "loraserve.modelServerKeySecret" -}}
{{ .Values.modelServerKey.existingSecret | default (printf "%s-model-server-key" .Release.Name) }}
{{- end -}}
{{- define "loraserve.routerApiKeySecret" -}}
{{ printf "%s-router-api-key" .Release.Name }}
{{- end -}}
{{- /* The Secret whose keys.yaml the router reads: yours, the generated one, or none (auth explicitly off). */ -}}
{{- define "loraserve.routerKeysSecret" -}}
{{- if .Values.router.apiKeysSecret -}}
{{ .Values.router.apiKeysSecret }}
{{- else if .Values.router.auth.enabled -}}
{{ include "loraserve.routerApiKeySecret" . }}
{{- end -}}
{{- end -}}
