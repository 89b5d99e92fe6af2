/* eAC console: the treeview (ARIA tree keyboard model, children loaded on demand) and live
 * updates. Pages are rendered by the server; the WebSocket (htmx ws extension) brings
 * fragments with stable ids that htmx swaps in out of band. This file only does what htmx
 * cannot: put a moved VM under its new parent in name order, drop fragments for things the
 * page does not show, tell the server what the page shows (the table's query among it), fetch the
 * table again when its rows change, and resync after a reconnect.
 */
(function () {
  'use strict'

  var OPEN_COOKIE = 'eac_tree'
  var OPEN_STORE = 'eac.tree.open' // localStorage: every open node (the cookie holds the ones the server needs)
  var MAX_OPEN_KEYS = 80
  var socket = null // the ws extension's socket interface once open
  var opens = 0 // a second open is a reconnect: the page resyncs
  var failures = 0
  var resyncing = false
  var resyncAgain = false
  var refreshing = false // the VM table is being fetched again
  var refreshAgain = false
  var queued = new Map() // group id -> tree items that arrived while the group was loading
  var regionXhrs = new Set() // requests in flight that will replace #main or the VM table
  var held = [] // live messages that arrived meanwhile, applied after the swap

  function byId (id) { return document.getElementById(id) }
  function tree () { return document.querySelector('[role=tree]') }

  // -- the tree -------------------------------------------------------------------------------

  function visibleItems () {
    var root = tree()
    if (!root) return []
    return Array.prototype.filter.call(root.querySelectorAll('[role=treeitem]'), function (el) {
      return el.offsetParent !== null
    })
  }

  function parentItem (item) {
    var group = item.parentElement && item.parentElement.closest('[role=group]')
    return group ? group.closest('[role=treeitem]') : null
  }

  function setCurrent (item, focus) {
    var root = tree()
    if (!root || !item) return
    root.querySelectorAll('[role=treeitem][tabindex="0"]').forEach(function (el) {
      if (el !== item) el.setAttribute('tabindex', '-1')
    })
    item.setAttribute('tabindex', '0')
    if (focus) item.focus()
  }

  function ensureTabStop () {
    var root = tree()
    if (!root || root.querySelector('[role=treeitem][tabindex="0"]')) return
    var item = root.querySelector('.ti.is-current') || root.querySelector('[role=treeitem]')
    if (item) item.setAttribute('tabindex', '0')
  }

  function openKeys () {
    var root = tree()
    if (!root) return []
    return Array.prototype.map.call(root.querySelectorAll('[role=treeitem][aria-expanded=true]'), function (el) {
      return el.dataset.key
    }).filter(Boolean)
  }

  function isShown (item) {
    for (var up = parentItem(item); up; up = parentItem(up)) {
      if (up.getAttribute('aria-expanded') !== 'true') return false
    }
    return true
  }

  // Which nodes are open is kept in the browser twice: every open node in localStorage, and in the cookie the
  // server reads to render open nodes with their children, a bounded list (a cookie holds 4 kB): the pools
  // first, then the open nodes the user sees, then the others (open inside a folded pool).
  function saveOpen () {
    var keys = openKeys()
    try { localStorage.setItem(OPEN_STORE, JSON.stringify(keys)) } catch (e) {}
    var root = tree()
    var rank = function (key) {
      if (key.indexOf('pool-') === 0) return 0
      var item = root && byId('ti-' + key)
      return item && isShown(item) ? 1 : 2
    }
    var ranked = keys.map(function (key, i) { return [rank(key), i, key] })
    ranked.sort(function (a, b) { return a[0] - b[0] || a[1] - b[1] })
    var bounded = ranked.slice(0, MAX_OPEN_KEYS).map(function (r) { return r[2] })
    document.cookie = OPEN_COOKIE + '=' + bounded.join('.') + '; path=/; max-age=31536000; SameSite=Lax'
    sendState()
  }

  // The page was rendered from the cookie, which may have left out nodes (too many): open and fold the nodes as
  // localStorage has them, and load the children of those that are open and now in view.
  function restoreOpen () {
    var root = tree()
    var stored = null
    try { stored = JSON.parse(localStorage.getItem(OPEN_STORE) || 'null') } catch (e) {}
    if (!root || !Array.isArray(stored)) return
    var open = new Set(stored)
    var changed = false
    root.querySelectorAll('[role=treeitem][aria-expanded][data-key]').forEach(function (item) {
      var want = open.has(item.dataset.key) ? 'true' : 'false'
      if (item.getAttribute('aria-expanded') !== want) { item.setAttribute('aria-expanded', want); changed = true }
    })
    loadShownChildren(root)
    if (changed) saveOpen()
  }

  // Open nodes below ``top`` whose children were not loaded with the page (they were out of view): load those the
  // user now sees.
  function loadShownChildren (top) {
    if (!top) return
    top.querySelectorAll('[role=treeitem][aria-expanded=true]').forEach(function (item) {
      if (isShown(item)) loadChildren(item)
    })
  }

  function groupOf (item) {
    return item.querySelector(':scope > [role=group]')
  }

  function loadChildren (item) {
    var group = groupOf(item)
    if (!group || group.dataset.loaded !== '0' || !item.dataset.children) return
    group.dataset.loaded = 'loading'
    group.setAttribute('aria-busy', 'true')
    htmx.ajax('GET', item.dataset.children, { target: group, swap: 'innerHTML' }).then(function () {
      group.dataset.loaded = '1'
      group.removeAttribute('aria-busy')
      var pending = queued.get(group.id) || []
      queued.delete(group.id)
      pending.forEach(function (node) { placeTreeItem(node) })
      ensureTabStop()
    }, function () {
      group.dataset.loaded = '0'
      group.removeAttribute('aria-busy')
    })
  }

  function expand (item) {
    if (!item.hasAttribute('aria-expanded')) return
    item.setAttribute('aria-expanded', 'true')
    loadChildren(item)
    loadShownChildren(item)
    saveOpen()
  }

  // The tree's "Expand all" / "Collapse all": every pool at once.
  function foldPools (open) {
    var root = tree()
    if (!root) return
    root.querySelectorAll(':scope > .ti-pool[aria-expanded]').forEach(function (item) {
      item.setAttribute('aria-expanded', open ? 'true' : 'false')
    })
    if (open) loadShownChildren(root)
    saveOpen()
  }

  function collapse (item) {
    if (!item.hasAttribute('aria-expanded')) return
    item.setAttribute('aria-expanded', 'false')
    saveOpen()
  }

  function toggle (item) {
    if (item.getAttribute('aria-expanded') === 'true') collapse(item)
    else expand(item)
  }

  function loadMore (item) {
    if (item.dataset.busy) return
    item.dataset.busy = '1'
    var focused = document.activeElement === item
    var prev = item.previousElementSibling
    htmx.ajax('GET', item.dataset.more, { target: item, swap: 'outerHTML' }).then(function () {
      var next = prev ? prev.nextElementSibling : null
      if (focused && next) setCurrent(next, true)
    })
  }

  function activate (item) {
    if (item.dataset.more) { loadMore(item); return }
    var link = item.querySelector(':scope > .tree-row a.tree-link')
    if (link) link.click()
    else toggle(item)
  }

  function onTreeKey (event) {
    var item = event.target.closest('[role=treeitem]')
    if (!item || event.altKey || event.ctrlKey || event.metaKey) return
    var items = visibleItems()
    var i = items.indexOf(item)
    var expanded = item.getAttribute('aria-expanded')
    var target = null
    switch (event.key) {
      case 'ArrowDown': target = items[i + 1]; break
      case 'ArrowUp': target = items[i - 1]; break
      case 'Home': target = items[0]; break
      case 'End': target = items[items.length - 1]; break
      case 'ArrowRight':
        if (expanded === 'false') expand(item)
        else if (expanded === 'true') target = groupOf(item) && groupOf(item).querySelector('[role=treeitem]')
        break
      case 'ArrowLeft':
        if (expanded === 'true') collapse(item)
        else target = parentItem(item)
        break
      case 'Enter': activate(item); break
      case ' ': if (expanded !== null) toggle(item); else activate(item); break
      default: return
    }
    event.preventDefault()
    if (target) setCurrent(target, true)
  }

  function onTreeClick (event) {
    var item = event.target.closest('[role=treeitem]')
    if (!item) return
    if (item.dataset.more) { loadMore(item); return }
    if (event.target.closest('.twisty') || (event.target.closest('.tree-row') && !event.target.closest('a'))) {
      if (item.hasAttribute('aria-expanded')) toggle(item)
    }
    setCurrent(item, false)
  }

  // The header's sections by the start of the path, longest first (as inventory/tree.py's SECTIONS).
  var SECTIONS = [['/protection/audit/', 'audit'], ['/protection/', 'protection'],
    ['/alerts/recipients/', 'recipients'], ['/alerts/', 'alerts'], ['/vms/', 'vms']]

  function markSection () {
    var path = location.pathname
    var section = path === '/' ? 'home' : ''
    for (var i = 0; !section && i < SECTIONS.length; i++) {
      if (path.indexOf(SECTIONS[i][0]) === 0) section = SECTIONS[i][1]
    }
    document.querySelectorAll('.topnav a[data-section]').forEach(function (a) {
      if (a.dataset.section === section) a.setAttribute('aria-current', 'page')
      else a.removeAttribute('aria-current')
    })
  }

  function markCurrent () {
    markSection()
    var root = tree()
    if (!root) return
    var path = location.pathname
    root.querySelectorAll('.ti.is-current').forEach(function (el) { el.classList.remove('is-current') })
    root.querySelectorAll('a.tree-link[aria-current]').forEach(function (el) { el.removeAttribute('aria-current') })
    var found = null
    root.querySelectorAll('a.tree-link').forEach(function (a) {
      if (!found && a.getAttribute('href') === path) found = a
    })
    if (found) {
      found.setAttribute('aria-current', 'page')
      var item = found.closest('[role=treeitem]')
      item.classList.add('is-current')
      if (!root.contains(document.activeElement)) setCurrent(item, false)
    }
    ensureTabStop()
  }

  // -- live fragments -------------------------------------------------------------------------

  function compareItems (a, b) {
    var an = a.dataset.name || ''
    var bn = b.dataset.name || ''
    if (an !== bn) return an < bn ? -1 : 1
    return (a.dataset.uuid || '') < (b.dataset.uuid || '') ? -1 : 1
  }

  function removeItem (el) {
    var group = el.parentElement
    if (el.getAttribute('tabindex') === '0' || el === document.activeElement) {
      var items = visibleItems()
      var i = items.indexOf(el)
      var next = items[i + 1] || items[i - 1] || parentItem(el)
      setCurrent(next, el === document.activeElement)
    }
    el.remove()
    if (group && !group.querySelector('.ti') && group.dataset.loaded === '1') {
      group.insertAdjacentHTML('beforeend', '<li class="tree-empty" role="none">No VMs</li>')
    }
  }

  function insertSorted (group, node) {
    var items = Array.prototype.filter.call(group.children, function (el) { return el.classList.contains('ti-vm') })
    var lo = 0
    var hi = items.length
    while (lo < hi) {
      var mid = (lo + hi) >> 1
      if (compareItems(items[mid], node) < 0) lo = mid + 1
      else hi = mid
    }
    var more = group.querySelector(':scope > .tree-more')
    // Past the last loaded item of a partly loaded list: it belongs to a page not fetched yet.
    if (lo === items.length && more) return
    var empty = group.querySelector(':scope > .tree-empty')
    if (empty) empty.remove()
    group.insertBefore(node, items[lo] || more || null)
    htmx.process(node)
  }

  // A VM's tree item: update it in place, move it under its new parent, or drop it.
  function placeTreeItem (node) {
    var current = byId(node.id)
    var group = byId('tg-' + node.dataset.parent)
    if (group && group.dataset.loaded === 'loading') {
      if (current) removeItem(current)
      var list = queued.get(group.id) || []
      list.push(node)
      queued.set(group.id, list)
      return
    }
    if (current && current.parentElement === group) {
      var tabindex = current.getAttribute('tabindex')
      var focused = current === document.activeElement
      var isCurrent = current.classList.contains('is-current')
      node.setAttribute('tabindex', tabindex)
      if (isCurrent) node.classList.add('is-current')
      current.replaceWith(node)
      htmx.process(node)
      if (focused) node.focus()
      return
    }
    if (current) removeItem(current)
    if (group && group.dataset.loaded === '1') insertSorted(group, node)
  }

  // Table rows come in a table of their own (a <tr> does not parse beside other elements).
  function swapRow (row) {
    var current = row.id && byId(row.id)
    if (!current) return
    if (row.getAttribute('hx-swap-oob') === 'delete') { current.remove(); updateSelection(); return }
    // A row that changes keeps its tick: the user chose it, the server does not know.
    var box = current.querySelector('input.vm-select')
    var ticked = box && box.checked
    htmx.swap(current, row.outerHTML, { swapStyle: 'outerHTML', swapDelay: 0, settleDelay: 0 })
    var fresh = byId(row.id)
    var freshBox = fresh && fresh.querySelector('input.vm-select')
    if (freshBox && ticked) freshBox.checked = true
  }

  // -- the table's selection (Administrators: "Protect selected…") ------------------------------

  function updateSelection () {
    var form = byId('vm-selection')
    if (!form) return
    var boxes = document.querySelectorAll('input.vm-select')
    var ticked = Array.prototype.filter.call(boxes, function (b) { return b.checked }).length
    form.querySelector('.selection-count .n').textContent = ticked
    form.classList.toggle('has-selection', ticked > 0)
    byId('protect-selected').disabled = ticked === 0
    var all = byId('vm-select-all')
    if (all) {
      all.checked = ticked > 0 && ticked === boxes.length
      all.indeterminate = ticked > 0 && ticked < boxes.length
    }
  }

  // A live message that arrives while a request that replaces a region of the page (#main, the VM table) is in
  // flight is held and applied after the swap, in order: applied before, the region's older render would
  // overwrite it (a VM page's Start button, whose response follows the VM's "Running" by a few milliseconds).
  function regionBusy () {
    regionXhrs.forEach(function (xhr) { if (xhr.readyState === 4) regionXhrs.delete(xhr) })
    return regionXhrs.size > 0
  }

  function replayHeld () {
    var texts = held
    held = []
    texts.forEach(function (text) {
      var tpl = document.createElement('template')
      tpl.innerHTML = filterMessage(text)
      if (!tpl.content.children.length) return
      Array.prototype.forEach.call(tpl.content.children, function (node) {
        if (!node.hasAttribute('hx-swap-oob')) node.setAttribute('hx-swap-oob', 'true')
      })
      htmx.swap(document.body, tpl.innerHTML, { swapStyle: 'none', swapDelay: 0, settleDelay: 0 })
    })
  }

  // Should the end of the request go unreported, held messages still go out once it is done.
  function replaySoon () {
    if (!held.length) return
    if (regionBusy()) setTimeout(replaySoon, 100)
    else replayHeld()
  }

  function filterMessage (text) {
    if (regionBusy()) {
      if (!held.length) setTimeout(replaySoon, 100)
      held.push(text)
      return ''
    }
    if (held.length) replayHeld()
    var tpl = document.createElement('template')
    tpl.innerHTML = text
    var out = []
    Array.prototype.slice.call(tpl.content.children).forEach(function (node) {
      if (node.id === 'live-control') { control(node.dataset.action); return }
      if (node.id === 'live-rows') { Array.prototype.forEach.call(node.querySelectorAll('tr'), swapRow); return }
      if (node.dataset.parent !== undefined) { placeTreeItem(document.importNode(node, true)); return }
      // Fragments of things this page does not show are dropped, not reported as errors.
      if (node.id && byId(node.id)) out.push(node.outerHTML)
    })
    return out.join('')
  }

  function control (action) {
    if (action === 'resync') resync()
    else if (action === 'refresh-table') refreshTable()
  }

  // Rows started or stopped matching the table's filters (or moved in its sort): fetch the table region
  // again, as the server last rendered it (its data-query), keeping the ticks and the filter form as they are.
  function refreshTable () {
    var region = byId('vm-table')
    if (!region) return
    if (resyncing) { resyncAgain = true; return }
    if (refreshing) { refreshAgain = true; return }
    refreshing = true
    var ticked = Array.prototype.filter.call(document.querySelectorAll('input.vm-select'), function (b) {
      return b.checked
    }).map(function (b) { return b.closest('tr').id })
    htmx.ajax('GET', location.pathname + '?' + region.dataset.query, {
      target: '#vm-table', select: '#vm-table', swap: 'outerHTML', selectOOB: '#vm-count'
    }).then(function () {
      ticked.forEach(function (id) {
        var box = byId(id) && byId(id).querySelector('input.vm-select')
        if (box) box.checked = true
      })
      updateSelection()
    }).finally(function () {
      refreshing = false
      document.body.dispatchEvent(new CustomEvent('eac:table-refreshed'))
      sendState()
      if (refreshAgain) { refreshAgain = false; refreshTable() }
    })
  }

  function resync () {
    if (resyncing) { resyncAgain = true; return }
    resyncing = true
    var focusedId = document.activeElement && tree() && tree().contains(document.activeElement)
      ? (document.activeElement.closest('[role=treeitem]') || {}).id : null
    htmx.ajax('GET', location.pathname + location.search, {
      target: '#main', select: '#main', swap: 'outerHTML', selectOOB: '#tree,#hdr-pools,#alerts-counter'
    }).then(function () {
      restoreOpen()
      markCurrent()
      if (focusedId && byId(focusedId)) setCurrent(byId(focusedId), true)
    }).finally(function () {
      resyncing = false
      document.body.dispatchEvent(new CustomEvent('eac:resynced'))
      sendState()
      if (resyncAgain) { resyncAgain = false; resync() }
    })
  }

  function sendState (extra) {
    if (!socket) return
    var main = byId('main')
    var message = { view: main ? (main.dataset.view || '') : '', open: openKeys() }
    if (message.view === 'vms') {
      message.rows = Array.prototype.map.call(document.querySelectorAll('tr.vm-row'), function (row) {
        return row.id.slice('row-vm-'.length)
      })
      // The table's filters, sort and page, and how many rows match: the server tells us when they change.
      var region = byId('vm-table')
      if (region) {
        message.query = region.dataset.query || ''
        message.total = parseInt(region.dataset.total, 10)
      }
    }
    if (extra) Object.keys(extra).forEach(function (k) { message[k] = extra[k] })
    socket.send(JSON.stringify(message))
  }

  function setLive (state, text) {
    var el = byId('live-status')
    if (el) {
      el.dataset.state = state
      el.querySelector('.live-text').textContent = text
    }
    var banner = byId('stale-banner')
    if (banner) banner.hidden = state !== 'offline'
    document.body.classList.toggle('is-stale', state === 'offline')
  }

  // After a few failed reconnects, find out whether the session is gone: then go to the login page.
  function checkSession () {
    fetch(location.href, { redirect: 'manual', credentials: 'same-origin' }).then(function (r) {
      if (r.type === 'opaqueredirect' || r.status === 302) location.reload()
    }, function () {})
  }

  // The extension and the socket listeners are in place before htmx processes the page.
  if (typeof htmx !== 'undefined') {
    htmx.defineExtension('eac-live', {
      transformResponse: function (text, xhr, elt) {
        if (!elt || !elt.hasAttribute || !elt.hasAttribute('ws-connect')) return text
        return filterMessage(text)
      }
    })
  }

  // Only the console's own socket (#live) says whether the page is live: a page may hold others
  // (a workflow's progress), which open and close as the user comes and goes.
  function isLive (event) { return event.target && event.target.id === 'live' }

  document.addEventListener('htmx:wsConnecting', function (event) {
    if (!isLive(event)) return
    setLive(opens ? 'offline' : 'connecting', opens ? 'Reconnecting…' : 'Connecting…')
  })
  document.addEventListener('htmx:wsOpen', function (event) {
    if (!isLive(event)) return
    socket = event.detail.socketWrapper
    opens += 1
    failures = 0
    setLive('live', 'Live')
    var live = byId('live')
    if (opens === 1) sendState({ rendered_at: parseFloat(live.dataset.renderedAt) })
    else { sendState(); resync() }
  })
  document.addEventListener('htmx:wsClose', function (event) {
    if (!isLive(event)) return
    var code = event.detail.event && event.detail.event.code
    var wrapper = event.detail.socketWrapper
    socket = null
    if (code >= 4000) { // the server refused this user: retrying would not help
      setLive('offline', 'Not live: access refused')
      return
    }
    setLive('offline', 'Not live')
    failures += 1
    if (failures >= 3) checkSession()
    // The extension retries only after abnormal closes; a server restart (1001, 1000) needs it too.
    if ([1006, 1011, 1012, 1013].indexOf(code) < 0 && wrapper && byId('live')) {
      setTimeout(function () { wrapper.reconnect() }, 500 + Math.random() * 1500)
    }
  })
  document.addEventListener('htmx:beforeSend', function (event) {
    var target = event.detail.target
    if (target && (target.id === 'main' || target.id === 'vm-table')) regionXhrs.add(event.detail.xhr)
  })
  document.addEventListener('htmx:afterRequest', function (event) {
    if (!regionXhrs.delete(event.detail.xhr)) return
    if (held.length && !regionBusy()) replayHeld()
  })
  document.addEventListener('htmx:afterSettle', function (event) {
    if (event.detail.target && event.detail.target.id === 'main') {
      markCurrent()
      updateSelection()
      sendState()
    }
  })
  // Filters left at "Any" stay out of the URL; another pool drops the host chosen in the previous one.
  document.addEventListener('htmx:configRequest', function (event) {
    if (!event.detail.elt.matches || !event.detail.elt.matches('form.filters')) return
    var params = event.detail.parameters
    var trigger = event.detail.triggeringEvent
    if (trigger && trigger.target && trigger.target.id === 'f-pool') delete params.host
    Object.keys(params).forEach(function (name) {
      if (params[name] === '') delete params[name]
    })
  })
  document.addEventListener('change', function (event) {
    var target = event.target
    if (target.id === 'vm-select-all') {
      document.querySelectorAll('input.vm-select').forEach(function (b) { b.checked = target.checked })
    }
    if (target.id === 'vm-select-all' || (target.classList && target.classList.contains('vm-select'))) updateSelection()
  })
  // A row of the VM table opens its VM.
  document.addEventListener('click', function (event) {
    var row = event.target.closest && event.target.closest('tr.vm-row')
    if (!row || event.target.closest('a, button, input, select, .c-select, .c-actions')) return
    var link = row.querySelector('td.c-name a')
    if (link) link.click()
  })

  // The header's menu of pools (many pools): closed by a click elsewhere or Escape, as menus are.
  function closeMenus (except) {
    document.querySelectorAll('details.hdr-menu[open]').forEach(function (menu) {
      if (menu !== except) menu.removeAttribute('open')
    })
  }

  function onReady () {
    // The tree element is replaced by a resync: listen on the document and filter.
    document.addEventListener('keydown', function (event) {
      if (tree() && tree().contains(event.target)) onTreeKey(event)
      if (event.key === 'Escape' && document.querySelector('details.hdr-menu[open]')) {
        var menu = document.querySelector('details.hdr-menu[open]')
        closeMenus(null)
        menu.querySelector('summary').focus()
      }
    })
    document.addEventListener('click', function (event) {
      if (tree() && tree().contains(event.target)) onTreeClick(event)
      var fold = event.target.closest && event.target.closest('[data-fold]')
      if (fold) foldPools(fold.dataset.fold === 'expand')
      closeMenus(event.target.closest && event.target.closest('details.hdr-menu'))
    })
    restoreOpen()
    markCurrent()
    updateSelection()
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', onReady)
  else onReady()
})()
