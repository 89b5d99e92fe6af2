// Connects Xen Orchestra's own `xen-api` client to a XAPI server (xapisim in the
// tests), loads every object, then follows events: renames a VM through the
// client and waits until the client's object cache shows the new name.
// Usage: node xo_client_check.mjs URL USER PASSWORD TRANSPORT(xml-rpc|json-rpc)
// Prints one JSON line: {transport, counts: {type: n}, renamed: bool}
import { createClient } from 'xen-api'

const [url, user, password, transport] = process.argv.slice(2)
const fail = (message) => { console.error(message); process.exit(1) }
setTimeout(() => fail('timed out'), 30000).unref()

const xapi = createClient({ url, auth: { user, password }, transport, allowUnauthorized: true })
await xapi.connect()
await xapi.objectsFetched

const counts = {}
for (const object of Object.values(xapi.objects.all)) {
  counts[object.$type] = (counts[object.$type] ?? 0) + 1
}

const vm = Object.values(xapi.objects.all).find(o => o.$type === 'VM' && !o.is_a_template && !o.is_control_domain)
if (vm === undefined) fail('no VM loaded')
const newName = `renamed-by-xo-${transport}`
const seen = new Promise(resolve => {
  xapi.objects.on('update', objects => {
    for (const object of Object.values(objects)) {
      if (object.$ref === vm.$ref && object.name_label === newName) resolve(true)
    }
  })
})
await xapi.call('VM.set_name_label', vm.$ref, newName)
const renamed = await seen

console.log(JSON.stringify({ transport, counts, renamed }))
await xapi.disconnect()
process.exit(0)
